//! The registration server's decisions (seed 000 FIG 15–18): tier redirection, software
//! update offers, sync-server allocation and the device type's default buckets.
//!
//! Pure functions over configuration; the HTTP handler applies the decision.

use std::collections::BTreeMap;

use serde::Deserialize;
use tether_proto::api::{RegisterRequest, SoftwareUpdate};
use tether_proto::synclog::{Change, ChangeKind};
use tether_proto::{Bucket, BucketId, Fields, Hlc, SetKey, Value};

use crate::error::{NodeError, Result};

/// A device type's default buckets: bucket kind → field names (created with null values).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct DeviceType {
    /// Kind (`device`, `shared`, …) → fields.
    pub buckets: BTreeMap<String, Vec<String>>,
}

/// Maps devices to tiers by id prefix and/or firmware version (FIG 15C, maps 150C/150D).
#[derive(Debug, Clone, Deserialize)]
pub struct TierRule {
    /// Matches device ids starting with this.
    #[serde(default)]
    pub device_id_prefix: Option<String>,
    /// Matches firmware versions satisfying this semver requirement (e.g. `<1.0.0`).
    #[serde(default)]
    pub sw_version: Option<semver::VersionReq>,
    /// The tier a matching device belongs to.
    pub tier: String,
    /// That tier's registration URL (required unless the tier is this node's own).
    #[serde(default)]
    pub redirect: Option<String>,
}

/// Firmware offered to a device type (FIG 16C, map 150B).
#[derive(Debug, Clone, Deserialize)]
pub struct SoftwareOffer {
    /// The device type it is for.
    pub device_type: String,
    /// The version devices should run.
    pub version: semver::Version,
    /// Where to fetch it (default for a blob: `/v1/blobs/<sha256>`).
    #[serde(default)]
    pub url: String,
    /// The image as a blob (`tether admin blob put` prints it): its SHA-256; devices of
    /// this type may then read that blob.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The blob's size in bytes (with `sha256`).
    #[serde(default)]
    pub size: Option<u64>,
    /// Ed25519 over the image's SHA-512 by the firmware key, 128 hex digits
    /// (`tether admin sign-firmware` prints it); devices take only signed blob offers.
    #[serde(default)]
    pub signature: Option<String>,
}

impl SoftwareOffer {
    /// The blob this offer names, if it names one.
    pub fn blob(&self) -> Option<tether_proto::blob::BlobHash> {
        self.sha256
            .as_deref()
            .and_then(|h| tether_proto::blob::BlobHash::parse(h).ok())
    }
}

/// Registration configuration (the `[device_types.*]`, `[[tier_rules]]` and
/// `[[software_updates]]` sections of the config file).
#[derive(Debug, Clone, Deserialize)]
pub struct RegistrationConfig {
    /// The tier this node serves.
    #[serde(default = "default_tier")]
    pub tier: String,
    /// Templates by device type; `thermostat` is built in.
    #[serde(default)]
    pub device_types: BTreeMap<String, DeviceType>,
    /// First matching rule wins; no match means this node's tier.
    #[serde(default)]
    pub tier_rules: Vec<TierRule>,
    /// Offers per device type.
    #[serde(default)]
    pub software_updates: Vec<SoftwareOffer>,
}

fn default_tier() -> String {
    "production".into()
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            tier: default_tier(),
            device_types: BTreeMap::new(),
            tier_rules: Vec::new(),
            software_updates: Vec::new(),
        }
    }
}

/// The built-in thermostat: what it measures in `device.X`, what users set in `shared.X`.
pub fn thermostat() -> DeviceType {
    let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    DeviceType {
        buckets: BTreeMap::from([
            (
                "device".to_string(),
                f(&[
                    "current_temperature",
                    "humidity",
                    "hvac_state",
                    "sw_version",
                ]),
            ),
            (
                "shared".to_string(),
                f(&["target_temperature", "mode", "name"]),
            ),
        ]),
    }
}

/// The bucket kind of structures (`structure.<key>`); a device type may not use it.
pub const STRUCTURE_KIND: &str = "structure";

/// The fields of a structure's bucket.
pub const STRUCTURE_FIELDS: [&str; 2] = ["name", "away"];

/// Firmware versions as devices report them; `1.2` reads as `1.2.0`.
pub fn parse_version(v: &str) -> Option<semver::Version> {
    semver::Version::parse(v).ok().or_else(|| {
        let dots = v.matches('.').count();
        let padded = match dots {
            0 => format!("{v}.0.0"),
            1 => format!("{v}.0"),
            _ => return None,
        };
        semver::Version::parse(&padded).ok()
    })
}

/// A default bucket as first created (version 1, its template's null fields, stamped
/// `now`) and the `created` change its log starts with — what the set's actor writes for
/// an ensured bucket, and what a first contact writes without an actor.
pub fn created(id: &BucketId, fields: &Fields, now: Hlc, by: &str) -> (Bucket, Change) {
    let bucket = Bucket::created(id.clone(), fields.clone(), now);
    let change = Change {
        version: bucket.version,
        timestamp: bucket.timestamp.millis,
        outcome: ChangeKind::Created,
        by: by.to_string(),
        session: None,
        op_id: None,
        fields: fields.clone(),
    };
    (bucket, change)
}

/// What registration decided for one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The device's tier.
    pub tier: String,
    /// Set when the tier is served elsewhere: nothing is created here.
    pub redirect: Option<String>,
    /// Newer firmware for its type.
    pub software_update: Option<SoftwareUpdate>,
    /// Buckets to create if missing (empty when redirected).
    pub buckets: Vec<(BucketId, Fields)>,
}

impl RegistrationConfig {
    /// Adds the built-in types that the config did not override.
    pub fn with_builtins(mut self) -> Self {
        self.device_types
            .entry("thermostat".into())
            .or_insert_with(thermostat);
        self
    }

    /// Checks the configuration once at start-up.
    pub fn validate(&self) -> Result<()> {
        for r in &self.tier_rules {
            if r.tier != self.tier && r.redirect.is_none() {
                return Err(NodeError::Config(format!(
                    "tier rule for tier {:?} needs a redirect URL",
                    r.tier
                )));
            }
        }
        for (name, t) in &self.device_types {
            if t.buckets.contains_key(STRUCTURE_KIND) {
                return Err(NodeError::Config(format!(
                    "device type {name}: the bucket kind {STRUCTURE_KIND:?} belongs to structures"
                )));
            }
            for kind in t.buckets.keys() {
                BucketId::parse(&format!("{kind}.x")).map_err(|_| {
                    NodeError::Config(format!("device type {name}: invalid bucket kind {kind:?}"))
                })?;
            }
        }
        for o in &self.software_updates {
            match (&o.sha256, o.blob(), o.size) {
                (None, _, _) if o.url.is_empty() => {
                    return Err(NodeError::Config(format!(
                        "software update {} for {}: needs a url or a blob (sha256 and size)",
                        o.version, o.device_type
                    )))
                }
                (Some(h), None, _) => {
                    return Err(NodeError::Config(format!(
                        "software update {}: sha256 {h:?} is not 64 hex digits",
                        o.version
                    )))
                }
                (Some(_), Some(_), None) => {
                    return Err(NodeError::Config(format!(
                        "software update {}: a blob offer needs its size",
                        o.version
                    )))
                }
                _ => {}
            }
            if let Some(sig) = &o.signature {
                if o.blob().is_none() {
                    return Err(NodeError::Config(format!(
                        "software update {}: a signature goes with a blob (sha256, size)",
                        o.version
                    )));
                }
                if tether_proto::dfu::parse_signature(sig).is_none() {
                    return Err(NodeError::Config(format!(
                        "software update {}: signature is not 128 hex digits \
                         (`tether admin sign-firmware` prints it)",
                        o.version
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether bucket kind `kind` of a set of `device_type` has field `field`; `None` when
    /// no template says (an unknown or removed device type).
    pub fn allows(&self, kind: &str, device_type: Option<&str>, field: &str) -> Option<bool> {
        if kind == STRUCTURE_KIND {
            return Some(STRUCTURE_FIELDS.contains(&field));
        }
        let fields = self.device_types.get(device_type?)?.buckets.get(kind)?;
        Some(fields.iter().any(|f| f == field))
    }

    /// The template fields of bucket kind `kind` of `device_type`, if a template says.
    pub fn fields(&self, kind: &str, device_type: Option<&str>) -> Option<Vec<String>> {
        if kind == STRUCTURE_KIND {
            return Some(STRUCTURE_FIELDS.iter().map(|f| f.to_string()).collect());
        }
        self.device_types
            .get(device_type?)?
            .buckets
            .get(kind)
            .cloned()
    }

    /// The registration decision for `req` from device `set` (FIG 15C, 16C, 18C).
    pub fn decide(&self, set: &SetKey, req: &RegisterRequest) -> Result<Decision> {
        let template = self.device_types.get(&req.device_type).ok_or_else(|| {
            NodeError::BadRequest(format!("unknown device_type {:?}", req.device_type))
        })?;
        let version = parse_version(&req.sw_version);
        let rule = self.tier_rules.iter().find(|r| {
            r.device_id_prefix
                .as_ref()
                .is_none_or(|p| req.device_id.starts_with(p.as_str()))
                && r.sw_version
                    .as_ref()
                    .is_none_or(|want| version.as_ref().is_some_and(|v| want.matches(v)))
                && (r.device_id_prefix.is_some() || r.sw_version.is_some())
        });
        let tier = rule.map_or_else(|| self.tier.clone(), |r| r.tier.clone());
        let redirect = rule
            .filter(|r| r.tier != self.tier)
            .and_then(|r| r.redirect.clone());
        let software_update = self
            .software_updates
            .iter()
            .filter(|o| o.device_type == req.device_type)
            .filter(|o| version.as_ref().is_none_or(|v| *v < o.version))
            .max_by(|a, b| a.version.cmp(&b.version))
            .map(|o| SoftwareUpdate {
                version: o.version.to_string(),
                url: match (&o.blob(), o.url.is_empty()) {
                    (Some(h), true) => format!("/v1/blobs/{h}"),
                    _ => o.url.clone(),
                },
                sha256: o.blob().map(|h| h.to_string()),
                size: o.blob().and(o.size),
                signature: o.blob().and(o.signature.clone()),
            });
        let buckets = if redirect.is_some() {
            Vec::new()
        } else {
            template
                .buckets
                .iter()
                .map(|(kind, fields)| {
                    let id = BucketId::new(kind, set)?;
                    let value: Fields = fields.iter().map(|f| (f.clone(), Value::Null)).collect();
                    Ok((id, value))
                })
                .collect::<Result<_>>()?
        };
        Ok(Decision {
            tier,
            redirect,
            software_update,
            buckets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, sw: &str) -> RegisterRequest {
        RegisterRequest {
            device_id: id.into(),
            device_type: "thermostat".into(),
            sw_version: sw.into(),
            next_sync_ms: None,
        }
    }

    fn config() -> RegistrationConfig {
        toml::from_str::<RegistrationConfig>(
            r#"
            [[tier_rules]]
            device_id_prefix = "BETA"
            tier = "beta"
            redirect = "https://beta.example/v1/register"
            [[tier_rules]]
            sw_version = "<1.0.0"
            tier = "legacy"
            redirect = "https://legacy.example/v1/register"
            [[software_updates]]
            device_type = "thermostat"
            version = "2.0.0"
            url = "https://fw.example/t-2.0.0.bin"
            "#,
        )
        .expect("valid config")
        .with_builtins()
    }

    #[test]
    fn fig15c_device_id_map_redirects_to_other_tier_without_creating_buckets() {
        let set = SetKey::parse("BETA01").expect("valid");
        let d = config()
            .decide(&set, &req("BETA01", "1.5.0"))
            .expect("decides");
        assert_eq!(d.tier, "beta");
        assert_eq!(
            d.redirect.as_deref(),
            Some("https://beta.example/v1/register")
        );
        assert!(d.buckets.is_empty());
    }

    #[test]
    fn fig15c_software_version_map_redirects() {
        let set = SetKey::parse("01AA").expect("valid");
        let d = config().decide(&set, &req("01AA", "0.9")).expect("decides");
        assert_eq!(d.tier, "legacy");
    }

    #[test]
    fn fig16c_offers_newer_firmware_only() {
        let set = SetKey::parse("01AA").expect("valid");
        let old = config()
            .decide(&set, &req("01AA", "1.2.0"))
            .expect("decides");
        assert_eq!(
            old.software_update.map(|u| u.version),
            Some("2.0.0".to_string())
        );
        let current = config()
            .decide(&set, &req("01AA", "2.0.0"))
            .expect("decides");
        assert_eq!(current.software_update, None);
    }

    #[test]
    fn a_firmware_signature_must_be_hex_and_go_with_a_blob() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let offer = |extra: &str| {
            toml::from_str::<RegistrationConfig>(&format!(
                "[[software_updates]]\ndevice_type = \"thermostat\"\nversion = \"2.0.0\"\n{extra}"
            ))
            .expect("parses")
            .with_builtins()
            .validate()
        };
        let sig = "ab".repeat(64);
        let blob = format!("sha256 = \"{hash}\"\nsize = 4\n");
        assert!(offer(&format!("{blob}signature = \"{sig}\"\n")).is_ok());
        assert!(offer(&format!("{blob}signature = \"{}\"\n", &sig[1..])).is_err());
        assert!(offer(&format!("{blob}signature = \"{}zz\"\n", &sig[2..])).is_err());
        assert!(
            offer(&format!("url = \"https://fw/x\"\nsignature = \"{sig}\"\n")).is_err(),
            "a signature without a blob"
        );
    }

    #[test]
    fn fig18c_thermostat_template_creates_null_valued_buckets() {
        let set = SetKey::parse("01AA").expect("valid");
        let d = config()
            .decide(&set, &req("01AA", "1.2.0"))
            .expect("decides");
        assert_eq!(d.tier, "production");
        let ids: Vec<_> = d.buckets.iter().map(|(id, _)| id.to_string()).collect();
        assert_eq!(ids, ["device.01AA", "shared.01AA"]);
        assert!(d
            .buckets
            .iter()
            .all(|(_, f)| f.values().all(Value::is_null) && !f.is_empty()));
    }

    #[test]
    fn unknown_device_type_is_a_bad_request() {
        let set = SetKey::parse("01AA").expect("valid");
        let mut r = req("01AA", "1.0.0");
        r.device_type = "toaster".into();
        assert!(matches!(
            config().decide(&set, &r),
            Err(NodeError::BadRequest(_))
        ));
    }
}
