//! What the thermostat does with its buckets (the server's `thermostat` template):
//! users set `target_temperature`, `mode` and `name` in `shared.<serial>`; the device
//! reports `current_temperature`, `hvac_state` and `sw_version` in `device.<serial>`.
//!
//! Pure: the driver feeds it held buckets and measurements and sends what it reports
//! with `DeviceClient::set_field`.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use tether_proto::client::ClientBucket;
use tether_proto::Value;

/// A measurement is reported when it moved at least this far from the last report, so
/// sensor noise does not turn into a PUT per reading.
pub const REPORT_DELTA_C: f64 = 0.5;

/// What the heating/cooling output should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hvac {
    /// Mode `off`, or no target yet.
    Off,
    /// Mode `heat` and below target.
    Heating,
    /// Mode `cool` and above target.
    Cooling,
    /// On, and at target.
    Idle,
}

impl Hvac {
    /// As reported in `hvac_state`.
    pub fn as_str(self) -> &'static str {
        match self {
            Hvac::Off => "off",
            Hvac::Heating => "heating",
            Hvac::Cooling => "cooling",
            Hvac::Idle => "idle",
        }
    }
}

/// The thermostat's state as its buckets and sensor describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct Thermostat {
    device_bucket: String,
    shared_bucket: String,
    sw_version: String,
    /// The user's target (°C), from `shared.target_temperature`.
    pub target: Option<f64>,
    /// The user's mode (`heat`, `cool`, `off`), from `shared.mode`.
    pub mode: Option<String>,
    /// The user's name for the device, from `shared.name`.
    pub name: Option<String>,
    measured: Option<f64>,
    /// What `device.<serial>` holds as last confirmed or sent by this device.
    reported_temperature: Option<f64>,
    reported_hvac: Option<String>,
    reported_sw: Option<String>,
}

impl Thermostat {
    /// A thermostat with serial `serial` running firmware `sw_version`.
    pub fn new(serial: &str, sw_version: &str) -> Self {
        Thermostat {
            device_bucket: format!("device.{serial}"),
            shared_bucket: format!("shared.{serial}"),
            sw_version: sw_version.to_string(),
            target: None,
            mode: None,
            name: None,
            measured: None,
            reported_temperature: None,
            reported_hvac: None,
            reported_sw: None,
        }
    }

    /// Forgets every setting and report (factory reset); the sensor reading stays.
    pub fn forget(&mut self) {
        (self.target, self.mode, self.name) = (None, None, None);
        self.reported_temperature = None;
        self.reported_hvac = None;
        self.reported_sw = None;
    }

    /// The bucket the device writes.
    pub fn device_bucket(&self) -> &str {
        &self.device_bucket
    }

    /// The bucket users write.
    pub fn shared_bucket(&self) -> &str {
        &self.shared_bucket
    }

    /// The last measurement (°C).
    pub fn measured(&self) -> Option<f64> {
        self.measured
    }

    /// Takes a held bucket's new state. Returns true when a user setting changed.
    pub fn apply(&mut self, bucket: &ClientBucket) -> bool {
        let v = &bucket.value;
        if bucket.id == self.shared_bucket {
            let target = v.get("target_temperature").and_then(Value::as_f64);
            let mode = v.get("mode").and_then(Value::as_str).map(String::from);
            let name = v.get("name").and_then(Value::as_str).map(String::from);
            let changed = (&target, &mode, &name) != (&self.target, &self.mode, &self.name);
            (self.target, self.mode, self.name) = (target, mode, name);
            changed
        } else if bucket.id == self.device_bucket {
            self.reported_temperature = v.get("current_temperature").and_then(Value::as_f64);
            self.reported_hvac = v
                .get("hvac_state")
                .and_then(Value::as_str)
                .map(String::from);
            self.reported_sw = v
                .get("sw_version")
                .and_then(Value::as_str)
                .map(String::from);
            false
        } else {
            false
        }
    }

    /// Takes a sensor reading (°C), rounded to the nRF TEMP peripheral's 0.25 °C steps.
    pub fn measure(&mut self, celsius: f64) {
        self.measured = Some(libm_round_quarter(celsius));
    }

    /// What the output should do now.
    pub fn hvac(&self) -> Hvac {
        let (Some(target), Some(t)) = (self.target, self.measured) else {
            return Hvac::Off;
        };
        match self.mode.as_deref() {
            Some("heat") if t < target => Hvac::Heating,
            Some("cool") if t > target => Hvac::Cooling,
            Some("heat" | "cool" | "auto") => Hvac::Idle,
            _ => Hvac::Off,
        }
    }

    /// The `device.<serial>` fields that differ from what was last reported, marked as
    /// reported; the driver sends each with `set_field(device_bucket(), name, value)`.
    pub fn reports(&mut self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if let Some(t) = self.measured {
            let moved = self
                .reported_temperature
                .is_none_or(|r| (t - r).abs() >= REPORT_DELTA_C);
            if moved {
                self.reported_temperature = Some(t);
                out.push(("current_temperature", Value::from(t)));
            }
            let hvac = self.hvac().as_str();
            if self.reported_hvac.as_deref() != Some(hvac) {
                self.reported_hvac = Some(hvac.to_string());
                out.push(("hvac_state", Value::from(hvac)));
            }
        }
        if self.reported_sw.as_deref() != Some(self.sw_version.as_str()) {
            self.reported_sw = Some(self.sw_version.clone());
            out.push(("sw_version", Value::from(self.sw_version.as_str())));
        }
        out
    }
}

/// Rounds to the nearest 0.25 without libm (no_std has no `f64::round`).
fn libm_round_quarter(x: f64) -> f64 {
    let q = x * 4.0;
    let r = if q >= 0.0 {
        (q + 0.5) as i64
    } else {
        (q - 0.5) as i64
    };
    r as f64 / 4.0
}
