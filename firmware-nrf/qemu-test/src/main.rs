//! The firmware's decisions on an emulated Cortex-M4 (QEMU `mps2-an386`, semihosting).
//!
//! Replays a recorded exchange between a thermostat and the Tether server through the
//! firmware's own sans-IO application (`tether_device::app::App`: `DeviceClient`, the HTTP
//! and protobuf mapping, the one-connection lane, credentials, the thermostat) and its
//! flash store (sequential-storage over a RAM flash with the nRF NVMC's geometry):
//!
//! register (assigned credentials issued) → fetch → sw_version PUT → subscribe →
//! notification → measured temperature PUT (the held subscribe hung up for it) →
//! a refused 409 → a merged PUT → a 503 retried with the same op id → a dropped link and
//! back-off → a held subscribe that times out → reboot from flash → subscribe with stored
//! versions → a diff applied to the held copy.
//!
//! Every answer is what the server sends (API.md; `node/tests/api.rs`), encoded with the
//! same protobuf types; every request the device emits is decoded and checked. Prints one
//! line per check and exits through semihosting: 0 when all passed, 1 otherwise.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::future::Future;
use core::pin::pin;
use core::task::{Context, Poll, Waker};

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use embedded_alloc::LlffHeap as Heap;
use embedded_storage_async::nor_flash::{
    ErrorType, MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use serde_json::json;

use embassy_boot::{
    BlockingFirmwareUpdater, BootLoader, BootLoaderConfig, FirmwareUpdaterConfig,
    State as BootState,
};
use tether_device::app::{
    App, Config, Offer, Reply, MAX_ANSWER_BYTES, REQUEST_TIMEOUT_MS, SUBSCRIBE_MARGIN_MS,
};
use tether_device::dfu::{self, Refused, CHUNK};
use tether_device::http::{split_url, HttpCall, Kind, Method, Target, PROTOBUF};
use tether_device::record;
use tether_device::store::{Store, KEY_BUCKETS, KEY_CREDENTIALS};
use tether_device::thermostat::Hvac;
use tether_proto::api::{
    BucketDoc, BucketList, HeldBucket, PairingCodeResponse, RegisterRequest, RegisterResponse,
    SoftwareUpdate, SubscribeRequest, UpdateOutcome, UpdateRequest, UpdateResponse, WireMessage,
};
use tether_proto::client::Event;
use tether_proto::{Fields, Millis, Value};

#[global_allocator]
static HEAP: Heap = Heap::empty();
const HEAP_SIZE: usize = 24 * 1024;

const SERIAL: &str = "01AA02AB";
const DEV: &str = "device.01AA02AB";
const SHARED: &str = "shared.01AA02AB";
const REGISTER_URL: &str = "http://10.42.0.1:8080";
/// The node's own base URL, as registration allocates it.
const SYNC_URL: &str = "http://10.42.0.1:8080";
const ASSIGNED_ID: &str = "a.01AA02AB";
const ASSIGNED_SECRET: &str = "a.Hx3kQ9vT_2mLwP8rZcYb0g";
const SESSION: &str = "fw.01AA02AB";
const HOLD_MS: u64 = 120_000;
const BACKOFF_MS: u64 = 1_000;
/// Server timestamps (ms since the epoch) of the recorded exchange.
const T0: u64 = 1_763_884_800_123;
/// The op-id nonce of the first boot (the hardware RNG's, on a device) …
const NONCE_1: u64 = 0x5eed;
/// … and of the second.
const NONCE_2: u64 = 0x5eee;
/// `DeviceClient`'s op ids are the nonce (8 bytes little-endian, URL64) and a counter.
const OP_PREFIX_1: &str = "7V4AAAAAAAA-";

// ---------------------------------------------------------------------------------------
// checks

struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    fn check(&mut self, ok: bool, what: fmt::Arguments<'_>) {
        let n = self.passed + self.failed + 1;
        if ok {
            self.passed += 1;
            hprintln!("ok {} - {}", n, what);
        } else {
            self.failed += 1;
            hprintln!("not ok {} - {}", n, what);
        }
    }

    fn eq<T: PartialEq + fmt::Debug>(&mut self, got: T, want: T, what: fmt::Arguments<'_>) {
        let ok = got == want;
        self.check(ok, what);
        if !ok {
            hprintln!("    got:  {:?}", got);
            hprintln!("    want: {:?}", want);
        }
    }
}

macro_rules! check {
    ($c:expr, $cond:expr, $($what:tt)+) => {{
        let ok = $cond;
        $c.check(ok, format_args!($($what)+))
    }};
}
macro_rules! check_eq {
    ($c:expr, $got:expr, $want:expr, $($what:tt)+) => {{
        let got = $got;
        $c.eq(got, $want, format_args!($($what)+))
    }};
}

// ---------------------------------------------------------------------------------------
// a RAM flash with the nRF52 NVMC's geometry, so sequential-storage runs as on the device

const PAGE: usize = 4096;
const PAGES: usize = 4;
static mut FLASH: [u8; PAGE * PAGES] = [0xFF; PAGE * PAGES];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlashError(NorFlashErrorKind);

impl NorFlashError for FlashError {
    fn kind(&self) -> NorFlashErrorKind {
        self.0
    }
}

/// The firmware update's partitions (bootloader state, active image, update), emulated
/// in RAM outside the 64 KB the test runs in (`memory.x` NVM); on the device, flash.
const STATE_LEN: usize = PAGE;
const ACTIVE_LEN: usize = 3 * PAGE;
/// An image and one page for the swap, as embassy-boot requires.
const DFU_LEN: usize = ACTIVE_LEN + PAGE;
#[link_section = ".nvm"]
static mut NVM_STATE: [u8; STATE_LEN] = [0; STATE_LEN];
#[link_section = ".nvm"]
static mut NVM_ACTIVE: [u8; ACTIVE_LEN] = [0; ACTIVE_LEN];
#[link_section = ".nvm"]
static mut NVM_DFU: [u8; DFU_LEN] = [0; DFU_LEN];

/// Which emulated flash a [`RamFlash`] is.
#[derive(Clone, Copy)]
enum Part {
    /// The records' pages (sequential-storage).
    Records,
    BootState,
    Active,
    Dfu,
}

/// NOR semantics: erase sets a page to 0xFF, a write can only clear bits. Reads of any
/// size, writes of 4 bytes, erases of 4 KB pages: the nRF NVMC's geometry.
struct RamFlash {
    mem: &'static mut [u8],
    writes: u32,
    erases: u32,
}

impl RamFlash {
    fn take() -> Self {
        Self::of(Part::Records)
    }

    fn of(part: Part) -> Self {
        // One owner of each region at a time: the test drops one before taking the next.
        let mem: &'static mut [u8] = unsafe {
            match part {
                Part::Records => &mut *core::ptr::addr_of_mut!(FLASH),
                Part::BootState => &mut *core::ptr::addr_of_mut!(NVM_STATE),
                Part::Active => &mut *core::ptr::addr_of_mut!(NVM_ACTIVE),
                Part::Dfu => &mut *core::ptr::addr_of_mut!(NVM_DFU),
            }
        };
        RamFlash {
            mem,
            writes: 0,
            erases: 0,
        }
    }

    /// Every page erased (a factory-fresh part).
    fn erased(part: Part) -> Self {
        let f = Self::of(part);
        f.mem.fill(0xFF);
        f
    }

    /// Erases a part no one holds now.
    fn erase(part: Part) {
        Self::of(part).mem.fill(0xFF);
    }

    fn range(
        &self,
        offset: u32,
        len: usize,
        align: usize,
    ) -> Result<core::ops::Range<usize>, FlashError> {
        let start = offset as usize;
        let end = start + len;
        if end > self.mem.len() {
            return Err(FlashError(NorFlashErrorKind::OutOfBounds));
        }
        if !start.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(FlashError(NorFlashErrorKind::NotAligned));
        }
        Ok(start..end)
    }
}

impl ErrorType for RamFlash {
    type Error = FlashError;
}

impl ReadNorFlash for RamFlash {
    const READ_SIZE: usize = 1;
    async fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FlashError> {
        let r = self.range(offset, bytes.len(), 1)?;
        bytes.copy_from_slice(&self.mem[r]);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.mem.len()
    }
}

impl NorFlash for RamFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = PAGE;
    async fn erase(&mut self, from: u32, to: u32) -> Result<(), FlashError> {
        let r = self.range(from, (to - from) as usize, PAGE)?;
        self.mem[r].fill(0xFF);
        self.erases += 1;
        Ok(())
    }
    async fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FlashError> {
        let r = self.range(offset, bytes.len(), 4)?;
        for (m, b) in self.mem[r].iter_mut().zip(bytes) {
            *m &= *b;
        }
        self.writes += 1;
        Ok(())
    }
}

impl MultiwriteNorFlash for RamFlash {}

/// The same flash for embassy-boot's bootloader, which is blocking.
impl embedded_storage::nor_flash::ReadNorFlash for RamFlash {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FlashError> {
        block_on(ReadNorFlash::read(self, offset, bytes))
    }
    fn capacity(&self) -> usize {
        self.mem.len()
    }
}

impl embedded_storage::nor_flash::NorFlash for RamFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = PAGE;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), FlashError> {
        block_on(NorFlash::erase(self, from, to))
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FlashError> {
        block_on(NorFlash::write(self, offset, bytes))
    }
}

/// Runs a future that never waits (the RAM flash completes every operation at once).
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

// ---------------------------------------------------------------------------------------
// the recorded server answers

fn fields(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => Fields::new(),
    }
}

fn doc(id: &str, timestamp: u64, version: u64, value: Value) -> BucketDoc {
    BucketDoc {
        id: id.into(),
        timestamp: Some(timestamp),
        version: Some(version),
        value: Some(fields(value)),
        base_version: None,
        changes: None,
    }
}

/// A bucket answered as the fields changed since `base` (subscribe with diffs).
fn diff(id: &str, timestamp: u64, version: u64, base: u64, changes: Value) -> BucketDoc {
    BucketDoc {
        id: id.into(),
        timestamp: Some(timestamp),
        version: Some(version),
        value: None,
        base_version: Some(base),
        changes: Some(fields(changes)),
    }
}

fn list(buckets: Vec<BucketDoc>) -> BucketList {
    BucketList {
        buckets,
        pending: vec![],
    }
}

/// One recorded HTTP answer.
struct Recorded {
    status: u16,
    content_type: &'static str,
    set_credentials: Option<String>,
    retry_after: Option<&'static str>,
    body: Vec<u8>,
}

impl Recorded {
    fn pb(status: u16, body: Vec<u8>) -> Self {
        Recorded {
            status,
            content_type: PROTOBUF,
            set_credentials: None,
            retry_after: None,
            body,
        }
    }

    /// Errors are JSON whatever the client asked for (API.md; node/src/error.rs).
    fn json_error(status: u16, code: &str, message: &str) -> Self {
        let body =
            serde_json::to_vec(&json!({"error": code, "message": message})).unwrap_or_default();
        Recorded {
            status,
            content_type: "application/json",
            set_credentials: None,
            retry_after: None,
            body,
        }
    }

    fn reply(&self) -> Reply<'_> {
        Reply {
            status: self.status,
            content_type: Some(self.content_type),
            set_credentials: self.set_credentials.as_deref(),
            retry_after: self.retry_after,
            content_range: None,
            body: &self.body,
        }
    }
}

fn register_answer() -> RegisterResponse {
    RegisterResponse {
        tier: "production".into(),
        redirect: None,
        software_update: None,
        sync_url: SYNC_URL.into(),
        buckets: vec![DEV.into(), SHARED.into()],
    }
}

// ---------------------------------------------------------------------------------------
// the device under test

struct Device {
    app: App,
    store: Store<RamFlash>,
    now: Millis,
    /// The subscribe the device is holding, if any.
    held: Option<HttpCall>,
    records_written: u32,
}

fn config(op_id_nonce: u64) -> Config {
    Config {
        serial: SERIAL.into(),
        key_id: "k1".into(),
        default_secret: "d.tZ2b9M0cQ7yJr4XwVn1KpE8sLf3aHg6uDqWiYo5ReTk".into(),
        register_url: REGISTER_URL.into(),
        sw_version: "1.2.0".into(),
        subscribe_timeout_ms: HOLD_MS,
        backoff_initial_ms: BACKOFF_MS,
        backoff_max_ms: 60_000,
        auth_backoff_max_ms: 3_600_000,
        jitter_seed: 7,
        op_id_nonce,
        firmware_key: *VENDOR_KEY,
        update_capacity: ACTIVE_LEN as u32,
    }
}

impl Device {
    /// Boots as the firmware does: open the store, restore what it holds.
    fn boot(c: &mut Checks, now: Millis, op_id_nonce: u64) -> Self {
        let mut store = Store::new(RamFlash::take(), 0..(PAGE * PAGES) as u32);
        let mut app = App::new(&config(op_id_nonce));
        let mut buckets = Vec::new();
        let mut creds = Vec::new();
        let has_b = block_on(store.load(KEY_BUCKETS, &mut buckets));
        let has_c = block_on(store.load(KEY_CREDENTIALS, &mut creds));
        check!(
            c,
            has_b.is_ok() && has_c.is_ok(),
            "boot: flash store opens and reads"
        );
        let restored = app.restore(
            has_b.unwrap_or(false).then_some(&buckets[..]),
            has_c.unwrap_or(false).then_some(&creds[..]),
        );
        hprintln!(
            "    boot at {} ms: restored {:?} buckets from flash",
            now,
            restored
        );
        Device {
            app,
            store,
            now,
            held: None,
            records_written: 0,
        }
    }

    /// Lets the application run, then persists what changed, as the firmware task does.
    fn poll(&mut self) -> Vec<Event> {
        let events = self.app.poll(self.now);
        if let Some(r) = self.app.take_buckets_record() {
            block_on(self.store.save(KEY_BUCKETS, &r)).expect("buckets record fits the store");
            self.records_written += 1;
        }
        if let Some(r) = self.app.take_credentials_record() {
            block_on(self.store.save(KEY_CREDENTIALS, &r)).expect("credentials record fits");
            self.records_written += 1;
        }
        events
    }

    /// The next call the device puts on the connection, checked against what is expected.
    fn expect_call(
        &mut self,
        c: &mut Checks,
        kind: Kind,
        method: Method,
        path: &str,
        auth: &str,
    ) -> HttpCall {
        let Some(call) = self.app.next_call(self.now) else {
            check!(
                c,
                false,
                "{} {}: the device sends it",
                method.as_str(),
                path
            );
            panic!("the recorded exchange cannot go on");
        };
        let url = alloc::format!("{SYNC_URL}{path}");
        check!(
            c,
            call.kind == kind && call.method == method && call.url == url,
            "device sends {} {} ({:?}, token {})",
            call.method.as_str(),
            call.url,
            call.kind,
            call.token
        );
        check_eq!(
            c,
            call.auth.id.as_str(),
            auth,
            "  with Basic auth id {}",
            auth
        );
        call
    }

    fn nothing_to_send(&mut self, c: &mut Checks, why: &str) {
        let next = self.app.next_call(self.now);
        check!(
            c,
            next.is_none(),
            "nothing is sent: {} (got {:?})",
            why,
            next.map(|n| n.url)
        );
    }

    fn answer(&mut self, c: &mut Checks, call: &HttpCall, rec: &Recorded) -> Vec<Event> {
        let r = self.app.answer(self.now, call, rec.reply());
        check!(
            c,
            r.is_ok(),
            "  server answers {} ({} bytes {}) and the device decodes it",
            rec.status,
            rec.body.len(),
            rec.content_type
        );
        self.poll()
    }
}

fn decode_put(c: &mut Checks, call: &HttpCall) -> UpdateRequest {
    let body = call.body.as_deref().unwrap_or_default();
    let put = UpdateRequest::decode_pb(body);
    check!(
        c,
        put.is_ok(),
        "  PUT body is a protobuf UpdateRequest ({} bytes)",
        body.len()
    );
    put.unwrap_or_else(|_| panic!("undecodable PUT"))
}

fn decode_subscribe(c: &mut Checks, call: &HttpCall) -> SubscribeRequest {
    let body = call.body.as_deref().unwrap_or_default();
    let sub = SubscribeRequest::decode_pb(body);
    check!(
        c,
        sub.is_ok(),
        "  subscribe body is a protobuf SubscribeRequest ({} bytes)",
        body.len()
    );
    sub.unwrap_or_else(|_| panic!("undecodable subscribe"))
}

fn held(id: &str, timestamp: u64, version: u64) -> HeldBucket {
    HeldBucket {
        id: id.into(),
        timestamp: Some(timestamp),
        version: Some(version),
    }
}

fn subscribe_of(buckets: Vec<HeldBucket>) -> SubscribeRequest {
    SubscribeRequest {
        buckets,
        session: Some(SESSION.into()),
        timeout_ms: Some(HOLD_MS),
        diffs: true,
        max_bytes: Some(MAX_ANSWER_BYTES),
        stream: false,
        next_sync_ms: None,
    }
}

/// The first boot's `n`-th op id.
fn op(n: u64) -> String {
    alloc::format!("{OP_PREFIX_1}{n}")
}

/// The first boot's `n`-th write.
fn update(value: Value, base_version: u64, n: u64) -> UpdateRequest {
    UpdateRequest {
        value: fields(value),
        base_version,
        occ: false,
        session: Some(SESSION.into()),
        op_id: Some(op(n)),
    }
}

fn changed(id: &str, version: u64) -> Event {
    Event::BucketChanged {
        id: id.into(),
        version,
    }
}

/// The acknowledgement of the first boot's `n`-th write, answered with `version`.
fn acked(id: &str, outcome: UpdateOutcome, version: u64, n: u64) -> Event {
    Event::ChangeAcked {
        id: id.into(),
        outcome,
        op_id: Some(op(n)),
        version,
        replayed: false,
    }
}

// ---------------------------------------------------------------------------------------
// the firmware update (build.rs makes the images)

static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/image.bin"));
static IMAGE_SHA256: &[u8; 32] = include_bytes!(concat!(env!("OUT_DIR"), "/image.sha256"));
static IMAGE_SIG: &[u8; 64] = include_bytes!(concat!(env!("OUT_DIR"), "/image.sig"));
static IMAGE_FORGED: &[u8; 64] = include_bytes!(concat!(env!("OUT_DIR"), "/image.forged"));
static VENDOR_KEY: &[u8; 32] = include_bytes!(concat!(env!("OUT_DIR"), "/vendor.pub"));
const NEW_VERSION: &str = "1.3.0";

type Updater = BlockingFirmwareUpdater<'static, RamFlash, RamFlash>;

/// The app's updater over the emulated state and update partitions.
fn new_updater() -> Updater {
    static mut ALIGNED: [u8; 4] = [0; 4];
    BlockingFirmwareUpdater::new(
        FirmwareUpdaterConfig {
            dfu: RamFlash::of(Part::Dfu),
            state: RamFlash::of(Part::BootState),
        },
        // One updater at a time (dropped before the next is made).
        unsafe { &mut *core::ptr::addr_of_mut!(ALIGNED) },
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| alloc::format!("{b:02x}")).collect()
}

/// What the server offers at registration: the image as a blob, signed with `signature`.
fn offer(signature: &[u8; 64]) -> SoftwareUpdate {
    let h = hex(IMAGE_SHA256);
    SoftwareUpdate {
        version: NEW_VERSION.into(),
        url: alloc::format!("/v1/blobs/{h}"),
        sha256: Some(h),
        size: Some(IMAGE.len() as u64),
        signature: Some(hex(signature)),
    }
}

/// A fresh device (erased flash, the bootloader state says "booted") registers and is
/// offered `offer`.
fn register_offered(c: &mut Checks, offer: SoftwareUpdate) -> Device {
    RamFlash::erase(Part::Records);
    RamFlash::erase(Part::BootState);
    RamFlash::erase(Part::Dfu);
    let active = RamFlash::erased(Part::Active);
    active.mem[..7].copy_from_slice(b"fw1.2.0");
    let mut d = Device::boot(c, 0, NONCE_1);
    d.poll();
    let call = d.expect_call(
        c,
        Kind::Register,
        Method::Post,
        "/v1/register",
        "d.01AA02AB.k1",
    );
    let mut answer = register_answer();
    answer.software_update = Some(offer.clone());
    let mut rec = Recorded::pb(200, answer.encode_pb());
    rec.set_credentials = Some(alloc::format!("{ASSIGNED_ID} {ASSIGNED_SECRET}"));
    let ev = d.answer(c, &call, &rec);
    check!(
        c,
        ev.contains(&Event::SoftwareUpdate(offer)),
        "  the registration answer offers firmware {}",
        NEW_VERSION
    );
    d
}

/// The next call is the image's range `first..=last`, with the assigned credentials.
fn expect_range(c: &mut Checks, d: &mut Device, first: usize, last: usize) -> HttpCall {
    let path = alloc::format!("/v1/blobs/{}", hex(IMAGE_SHA256));
    let call = d.expect_call(c, Kind::Firmware, Method::Get, &path, ASSIGNED_ID);
    check_eq!(
        c,
        call.range.clone(),
        Some(alloc::format!("bytes={first}-{last}")),
        "  Range bytes={}-{}",
        first,
        last
    );
    call
}

/// The server's 206 for `first..=last` of `image`.
fn partial(image: &[u8], first: usize, last: usize) -> (String, Vec<u8>) {
    (
        alloc::format!("bytes {first}-{last}/{}", image.len()),
        image[first..=last].to_vec(),
    )
}

/// Does what the firmware's driver does with a range's answer: the app checks it, the
/// chunk goes to the update partition, and after the last one the image is checked and
/// marked. Returns that check's result once the image is complete.
fn deliver(
    d: &mut Device,
    updater: &mut Updater,
    range: &str,
    body: &[u8],
) -> Option<Result<(), Refused>> {
    let reply = Reply {
        status: 206,
        content_type: Some("application/octet-stream"),
        set_credentials: None,
        retry_after: None,
        content_range: Some(range),
        body,
    };
    let chunk = d.app.firmware_answer(d.now, reply)?;
    let stored = dfu::store(updater, &chunk);
    let image = d.app.firmware_stored(d.now, &chunk, stored.is_ok())?;
    let checked = dfu::check_and_mark(updater, &image, d.app.firmware_key());
    d.app.firmware_checked(checked);
    Some(checked)
}

/// Serves the rest of the download from `served` (the image, or a corruption of it),
/// range after range; returns the check's result.
fn download_rest(
    c: &mut Checks,
    d: &mut Device,
    updater: &mut Updater,
    served: &[u8],
) -> Result<(), Refused> {
    loop {
        let Some((first, size)) = d.app.firmware_progress() else {
            panic!("no download under way");
        };
        let (first, size) = (first as usize, size as usize);
        let last = (first + CHUNK as usize).min(size) - 1;
        let call = expect_range(c, d, first, last);
        let (range, body) = partial(served, first, last);
        if let Some(result) = deliver(d, updater, &range, &body) {
            return result;
        }
        d.poll();
        let _ = call;
    }
}

fn boot_state(updater: &mut Updater) -> Option<BootState> {
    updater.get_state().ok()
}

// The drops end each borrow of an emulated flash region before the next one is made.
#[allow(clippy::drop_non_drop)]
fn firmware_update(c: &mut Checks) {
    hprintln!("# firmware update: offered at registration, downloaded by ranges");
    let mut d = register_offered(c, offer(IMAGE_SIG));
    check_eq!(
        c,
        d.app.take_offer_news(),
        Some(Offer::Downloading {
            version: NEW_VERSION.into(),
            size: IMAGE.len() as u32
        }),
        "  the signed image of {} bytes fits the active partition: download starts",
        IMAGE.len()
    );
    let mut updater = new_updater();
    check_eq!(
        c,
        boot_state(&mut updater),
        Some(BootState::Boot),
        "  bootloader state: booted"
    );
    hprintln!("# three ranges of 1 KiB (before the fetch: the download goes first)");
    for i in 0..3 {
        let (first, last) = (i * 1024, i * 1024 + 1023);
        let _call = expect_range(c, &mut d, first, last);
        let (range, body) = partial(IMAGE, first, last);
        check!(
            c,
            deliver(&mut d, &mut updater, &range, &body).is_none(),
            "  stored bytes {}-{} in the update partition",
            first,
            last
        );
        d.poll();
    }
    hprintln!("# the link drops during the fourth range");
    let call = expect_range(c, &mut d, 3072, 4095);
    d.app.transport_failed(d.now, &call);
    d.poll();
    check_eq!(
        c,
        d.app.firmware_progress(),
        Some((3072, IMAGE.len() as u32)),
        "  3072 bytes kept: nothing is downloaded twice"
    );
    hprintln!("# meanwhile the device syncs: fetch, sw_version PUT, subscribe");
    let call = d.expect_call(
        c,
        Kind::Fetch,
        Method::Get,
        "/v1/buckets?view=full&ids=device.01AA02AB,shared.01AA02AB",
        ASSIGNED_ID,
    );
    let fetched = list(vec![
        doc(DEV, T0, 1, json!({"sw_version": null})),
        doc(SHARED, T0, 1, json!({"target_temperature": null})),
    ]);
    d.answer(c, &call, &Recorded::pb(200, fetched.encode_pb()));
    let call = d.expect_call(
        c,
        Kind::Put,
        Method::Put,
        "/v1/buckets/device.01AA02AB",
        ASSIGNED_ID,
    );
    let applied = UpdateResponse {
        outcome: UpdateOutcome::Applied,
        id: DEV.into(),
        timestamp: T0 + 5,
        version: 2,
        value: None,
        replayed: false,
        delivery: None,
    };
    d.answer(c, &call, &Recorded::pb(200, applied.encode_pb()));
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check!(
        c,
        !d.app.preempts(Kind::Subscribe),
        "  the subscribe is held while the download backs off"
    );
    check_eq!(
        c,
        d.app.wake_at(),
        Some(tether_proto::dfu::RETRY_INITIAL_MS),
        "  the device wakes when the back-off ends"
    );
    hprintln!("# the back-off ends: the held subscribe is hung up for the range");
    d.now = tether_proto::dfu::RETRY_INITIAL_MS;
    d.poll();
    check!(
        c,
        d.app.preempts(Kind::Subscribe),
        "  a waiting firmware range hangs up the held subscribe"
    );
    d.app.hung_up(d.now, &sub);
    d.poll();
    hprintln!("# the download resumes at byte 3072, not from the start");
    let _call = expect_range(c, &mut d, 3072, 4095);
    let (range, body) = partial(IMAGE, 3072, 4095);
    check!(
        c,
        deliver(&mut d, &mut updater, &range, &body).is_none(),
        "  stored bytes 3072-4095"
    );
    d.poll();
    let checked = download_rest(c, &mut d, &mut updater, IMAGE);
    check_eq!(
        c,
        checked,
        Ok(()),
        "  complete: SHA-256 and the vendor's signature check out, marked for the swap"
    );
    check_eq!(
        c,
        boot_state(&mut updater),
        Some(BootState::Swap),
        "  bootloader state: swap at the next boot"
    );
    check_eq!(c, d.app.firmware_progress(), None, "  the download is over");
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check!(c, sub.body.is_some(), "  and the device subscribes again");
    drop(updater);

    hprintln!("# reset: embassy-boot's bootloader swaps the image in");
    let mut boot = BootLoader::new(BootLoaderConfig {
        active: RamFlash::of(Part::Active),
        dfu: RamFlash::of(Part::Dfu),
        state: RamFlash::of(Part::BootState),
    });
    let mut page = [0u8; 256];
    let state = boot.prepare_boot(&mut page);
    check!(
        c,
        matches!(state, Ok(BootState::Swap)),
        "  the bootloader swaps ({:?})",
        state.map_err(|_| "boot error")
    );
    drop(boot);
    let active = RamFlash::of(Part::Active);
    check!(
        c,
        &active.mem[..IMAGE.len()] == IMAGE,
        "  the active partition now holds the new image, byte for byte"
    );
    drop(active);
    let mut updater = new_updater();
    check!(
        c,
        updater.mark_booted().is_ok(),
        "  the new firmware confirms itself (mark_booted) once it reaches the server"
    );
    check_eq!(
        c,
        boot_state(&mut updater),
        Some(BootState::Boot),
        "  bootloader state: booted, no roll-back"
    );
}

// The drops end each borrow of an emulated flash region before the next one is made.
#[allow(clippy::drop_non_drop)]
fn firmware_refused(c: &mut Checks) {
    hprintln!("# a corrupted image (one byte changed on the way) is refused");
    let mut d = register_offered(c, offer(IMAGE_SIG));
    let mut updater = new_updater();
    let mut corrupted = IMAGE.to_vec();
    corrupted[5_000] ^= 0x01;
    check_eq!(
        c,
        download_rest(c, &mut d, &mut updater, &corrupted),
        Err(Refused::HashMismatch),
        "  its SHA-256 is not the offer's: refused"
    );
    check_eq!(
        c,
        boot_state(&mut updater),
        Some(BootState::Boot),
        "  not marked: the bootloader keeps the running image"
    );
    check_eq!(
        c,
        d.app.firmware_progress(),
        None,
        "  the download is dropped"
    );
    drop(updater);

    hprintln!("# an image signed with another key is refused");
    let mut d = register_offered(c, offer(IMAGE_FORGED));
    let mut updater = new_updater();
    check_eq!(
        c,
        download_rest(c, &mut d, &mut updater, IMAGE),
        Err(Refused::BadSignature),
        "  right bytes, wrong key: refused"
    );
    check_eq!(
        c,
        boot_state(&mut updater),
        Some(BootState::Boot),
        "  not marked"
    );
    drop(updater);
    let active = RamFlash::of(Part::Active);
    check!(
        c,
        active.mem.starts_with(b"fw1.2.0"),
        "  the active partition still holds the running firmware"
    );

    hprintln!("# offers the device cannot take");
    let mut unsigned = offer(IMAGE_SIG);
    unsigned.signature = None;
    let mut d = register_offered(c, unsigned);
    check_eq!(
        c,
        d.app.take_offer_news(),
        Some(Offer::Declined("unsigned")),
        "  an unsigned offer is declined"
    );
    let call = d.app.next_call(d.now);
    check!(
        c,
        call.as_ref().is_some_and(|c| c.kind == Kind::Fetch),
        "  and nothing is downloaded: the device fetches its buckets"
    );
}

// ---------------------------------------------------------------------------------------
// the recorded exchange

fn scenario(c: &mut Checks) {
    hprintln!("# boot 1: empty flash");
    let mut d = Device::boot(c, 0, NONCE_1);
    check_eq!(
        c,
        d.app.client().buckets().count(),
        0,
        "fresh device holds no bucket"
    );
    d.poll();

    hprintln!("# register with default credentials; the server assigns credentials");
    let call = d.expect_call(
        c,
        Kind::Register,
        Method::Post,
        "/v1/register",
        "d.01AA02AB.k1",
    );
    let body = call.body.as_deref().unwrap_or_default();
    check_eq!(
        c,
        RegisterRequest::decode_pb(body).ok(),
        Some(RegisterRequest {
            device_id: SERIAL.into(),
            device_type: "thermostat".into(),
            sw_version: "1.2.0".into(),
            next_sync_ms: None,
        }),
        "  register body: device_id, device_type thermostat, sw_version 1.2.0 ({} bytes)",
        body.len()
    );
    let mut rec = Recorded::pb(200, register_answer().encode_pb());
    rec.set_credentials = Some(alloc::format!("{ASSIGNED_ID} {ASSIGNED_SECRET}"));
    let ev = d.answer(c, &call, &rec);
    check_eq!(
        c,
        ev,
        vec![
            Event::CredentialsStored {
                id: ASSIGNED_ID.into()
            },
            Event::Registered
        ],
        "  events CredentialsStored a.01AA02AB, Registered"
    );
    let mut creds = Vec::new();
    let stored = block_on(d.store.load(KEY_CREDENTIALS, &mut creds));
    check_eq!(
        c,
        (
            stored,
            record::decode_credentials(&creds)
                .ok()
                .flatten()
                .map(|c| (c.id, c.secret))
        ),
        (Ok(true), Some((ASSIGNED_ID.into(), ASSIGNED_SECRET.into()))),
        "  assigned credentials written to flash at once"
    );

    hprintln!("# fetch both buckets in full (the template's null-valued fields)");
    let call = d.expect_call(
        c,
        Kind::Fetch,
        Method::Get,
        "/v1/buckets?view=full&ids=device.01AA02AB,shared.01AA02AB",
        ASSIGNED_ID,
    );
    check!(c, call.body.is_none(), "  GET carries no body");
    let fetched = list(vec![
        doc(
            DEV,
            T0,
            1,
            json!({"current_temperature": null, "humidity": null, "hvac_state": null, "sw_version": null}),
        ),
        doc(
            SHARED,
            T0,
            1,
            json!({"target_temperature": null, "mode": null, "name": null}),
        ),
    ]);
    let ev = d.answer(c, &call, &Recorded::pb(200, fetched.encode_pb()));
    check_eq!(
        c,
        ev,
        vec![changed(DEV, 1), changed(SHARED, 1)],
        "  events BucketChanged device v1, shared v1"
    );
    let mut rec_bytes = Vec::new();
    let _ = block_on(d.store.load(KEY_BUCKETS, &mut rec_bytes));
    check_eq!(
        c,
        record::decode_buckets(&rec_bytes).ok(),
        Some(d.app.client().snapshot()),
        "  buckets record in flash ({} bytes) decodes to the held buckets",
        rec_bytes.len()
    );

    hprintln!("# the device reports its sw_version: the PUT goes before the subscribe");
    let call = d.expect_call(
        c,
        Kind::Put,
        Method::Put,
        "/v1/buckets/device.01AA02AB",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_put(c, &call),
        update(json!({"sw_version": "1.2.0"}), 1, 1),
        "  PUT {{sw_version: 1.2.0}} on base_version 1, session, no OCC"
    );
    let applied = UpdateResponse {
        outcome: UpdateOutcome::Applied,
        id: DEV.into(),
        timestamp: T0 + 412,
        version: 2,
        value: None,
        replayed: false,
        delivery: None,
    };
    let ev = d.answer(c, &call, &Recorded::pb(200, applied.encode_pb()));
    check_eq!(
        c,
        ev,
        vec![changed(DEV, 2), acked(DEV, UpdateOutcome::Applied, 2, 1)],
        "  applied: device bucket now v2"
    );
    let dev = d.app.client().bucket(DEV).cloned();
    check_eq!(
        c,
        dev.map(|b| (b.version, b.timestamp, b.value.get("sw_version").cloned())),
        Some((2, T0 + 412, Some(json!("1.2.0")))),
        "  held device v2 carries the sent field and the server's timestamp"
    );

    hprintln!("# hold a subscribe with both versions");
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_subscribe(c, &sub),
        subscribe_of(vec![held(DEV, T0 + 412, 2), held(SHARED, T0, 1)]),
        "  subscribe holds device v2, shared v1, session, timeout 120 s"
    );
    check_eq!(
        c,
        d.app.call_timeout_ms(Kind::Subscribe),
        HOLD_MS + SUBSCRIBE_MARGIN_MS,
        "  driver gives up on the hold after timeout + margin"
    );
    check_eq!(
        c,
        d.app.call_timeout_ms(Kind::Put),
        REQUEST_TIMEOUT_MS,
        "  other calls time out after 30 s"
    );
    d.nothing_to_send(c, "the subscribe is held");

    hprintln!("# notification: a user set target 21.5 heat, named it Hallway");
    d.now = 40_000;
    let note = list(vec![doc(
        SHARED,
        T0 + 40_000,
        2,
        json!({"target_temperature": 21.5, "mode": "heat", "name": "Hallway"}),
    )]);
    let ev = d.answer(c, &sub, &Recorded::pb(200, note.encode_pb()));
    check_eq!(
        c,
        ev,
        vec![changed(SHARED, 2)],
        "  event BucketChanged shared v2"
    );
    let t = &d.app.thermostat;
    check_eq!(
        c,
        (t.target, t.mode.as_deref(), t.name.as_deref()),
        (Some(21.5), Some("heat"), Some("Hallway")),
        "  thermostat applies target 21.5, mode heat, name Hallway"
    );
    check_eq!(
        c,
        d.app.thermostat.hvac(),
        Hvac::Off,
        "  no reading yet: output stays off"
    );
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_subscribe(c, &sub),
        subscribe_of(vec![held(DEV, T0 + 412, 2), held(SHARED, T0 + 40_000, 2)]),
        "  resubscribes at once with shared v2"
    );
    d.held = Some(sub);

    hprintln!("# a reading of 19.1 C while the subscribe is held");
    d.now = 50_000;
    d.app.measured(19.1);
    d.poll();
    check_eq!(
        c,
        d.app.thermostat.hvac(),
        Hvac::Heating,
        "  19.0 < 21.5 in heat mode: heating (LED on)"
    );
    check!(
        c,
        d.app.preempts(Kind::Subscribe),
        "  the waiting PUT preempts the held subscribe"
    );
    let sub = d.held.take().unwrap_or_else(|| panic!("held"));
    d.app.hung_up(d.now, &sub);
    d.poll();
    let call = d.expect_call(
        c,
        Kind::Put,
        Method::Put,
        "/v1/buckets/device.01AA02AB",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_put(c, &call),
        update(
            json!({"current_temperature": 19.0, "hvac_state": "heating"}),
            2,
            2
        ),
        "  PUT {{current_temperature: 19.0, hvac_state: heating}} on base 2 (0.25 C steps)"
    );
    let applied = UpdateResponse {
        outcome: UpdateOutcome::Applied,
        id: DEV.into(),
        timestamp: T0 + 50_007,
        version: 3,
        value: None,
        replayed: false,
        delivery: None,
    };
    let ev = d.answer(c, &call, &Recorded::pb(200, applied.encode_pb()));
    check_eq!(
        c,
        ev,
        vec![changed(DEV, 3), acked(DEV, UpdateOutcome::Applied, 3, 2)],
        "  applied: device v3"
    );
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_subscribe(c, &sub),
        subscribe_of(vec![
            held(DEV, T0 + 50_007, 3),
            held(SHARED, T0 + 40_000, 2)
        ]),
        "  the hung-up subscribe is resent at once (no back-off) with device v3"
    );
    d.app.measured(19.2);
    d.poll();
    check!(
        c,
        !d.app.preempts(Kind::Subscribe),
        "  19.2 C rounds to 19.25, under the 0.5 C report step: no PUT"
    );

    hprintln!("# refused: mode off pressed on the device; a newer write won (409)");
    d.now = 61_000;
    d.app.set_shared("mode", json!("off"));
    d.poll();
    check!(
        c,
        d.app.preempts(Kind::Subscribe),
        "  the local change preempts the held subscribe"
    );
    d.app.hung_up(d.now, &sub);
    d.poll();
    let call = d.expect_call(
        c,
        Kind::Put,
        Method::Put,
        "/v1/buckets/shared.01AA02AB",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_put(c, &call),
        update(json!({"mode": "off"}), 2, 3),
        "  PUT {{mode: off}} on base 2"
    );
    let refused = UpdateResponse {
        outcome: UpdateOutcome::Refused,
        id: SHARED.into(),
        timestamp: T0 + 61_500,
        version: 3,
        value: Some(fields(
            json!({"target_temperature": 21.5, "mode": "cool", "name": "Hallway"}),
        )),
        replayed: false,
        delivery: None,
    };
    let ev = d.answer(c, &call, &Recorded::pb(409, refused.encode_pb()));
    check_eq!(
        c,
        ev,
        vec![
            changed(SHARED, 3),
            acked(SHARED, UpdateOutcome::Refused, 3, 3)
        ],
        "  refused: the change is dropped, the stored shared v3 is taken"
    );
    check_eq!(
        c,
        d.app.thermostat.mode.as_deref(),
        Some("cool"),
        "  thermostat follows the stored mode cool"
    );
    check_eq!(
        c,
        d.app.client().pending(SHARED),
        None,
        "  nothing left to resend for shared"
    );
    check_eq!(
        c,
        d.app.thermostat.hvac(),
        Hvac::Idle,
        "  cool mode at 19.25 < 21.5: idle (LED off)"
    );
    let call = d.expect_call(
        c,
        Kind::Put,
        Method::Put,
        "/v1/buckets/device.01AA02AB",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_put(c, &call),
        update(json!({"hvac_state": "idle"}), 3, 4),
        "  reports hvac_state idle on base 3"
    );

    hprintln!("# a 503 on that PUT keeps the write and retries it after a back-off");
    let mut unavailable = Recorded::json_error(503, "unavailable", "node is draining");
    unavailable.retry_after = Some("1");
    let ev = d.answer(c, &call, &unavailable);
    check!(c, ev.is_empty(), "  no event for a retryable failure");
    check_eq!(
        c,
        d.app.client().in_doubt().map(|(id, body)| (
            id,
            body.value.get("hvac_state").cloned(),
            body.op_id.clone()
        )),
        Some((DEV, Some(json!("idle")), Some(op(4)))),
        "  the write is kept as sent (it may have been applied): same op id"
    );
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_subscribe(c, &sub).buckets,
        vec![held(DEV, T0 + 50_007, 3), held(SHARED, T0 + 61_500, 3)],
        "  meanwhile resubscribes with shared v3"
    );
    let wake = d.app.wake_at().unwrap_or(0);
    check!(
        c,
        wake > d.now && wake <= d.now + BACKOFF_MS,
        "  PUT retry due after the back-off (at {} ms, now {})",
        wake,
        d.now
    );
    d.now = wake;
    d.poll();
    check!(
        c,
        d.app.preempts(Kind::Subscribe),
        "  the retry preempts the held subscribe"
    );
    d.app.hung_up(d.now, &sub);
    d.poll();
    let call = d.expect_call(
        c,
        Kind::Put,
        Method::Put,
        "/v1/buckets/device.01AA02AB",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_put(c, &call),
        update(json!({"hvac_state": "idle"}), 3, 4),
        "  the same write is resent, with the same op id (applied at most once)"
    );
    let applied = UpdateResponse {
        outcome: UpdateOutcome::Applied,
        id: DEV.into(),
        timestamp: T0 + 63_000,
        version: 4,
        value: None,
        replayed: false,
        delivery: None,
    };
    let ev = d.answer(c, &call, &Recorded::pb(200, applied.encode_pb()));
    check_eq!(
        c,
        ev,
        vec![changed(DEV, 4), acked(DEV, UpdateOutcome::Applied, 4, 4)],
        "  applied: device v4"
    );
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );

    hprintln!("# merged: target 22 set on the device on base 3 while the app renamed it (v4)");
    d.now = 70_000;
    d.app.set_shared("target_temperature", json!(22.0));
    d.poll();
    d.app.hung_up(d.now, &sub);
    d.poll();
    let call = d.expect_call(
        c,
        Kind::Put,
        Method::Put,
        "/v1/buckets/shared.01AA02AB",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_put(c, &call),
        update(json!({"target_temperature": 22.0}), 3, 5),
        "  PUT {{target_temperature: 22.0}} on base 3"
    );
    let merged = UpdateResponse {
        outcome: UpdateOutcome::Merged,
        id: SHARED.into(),
        timestamp: T0 + 70_010,
        version: 5,
        value: Some(fields(
            json!({"target_temperature": 22.0, "mode": "cool", "name": "Living room"}),
        )),
        replayed: false,
        delivery: None,
    };
    let ev = d.answer(c, &call, &Recorded::pb(200, merged.encode_pb()));
    check_eq!(
        c,
        ev,
        vec![
            changed(SHARED, 5),
            acked(SHARED, UpdateOutcome::Merged, 5, 5)
        ],
        "  merged: shared v5 is the server's merge"
    );
    let t = &d.app.thermostat;
    check_eq!(
        c,
        (t.target, t.mode.as_deref(), t.name.as_deref()),
        (Some(22.0), Some("cool"), Some("Living room")),
        "  thermostat: its own target 22 with the app's name Living room"
    );
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_subscribe(c, &sub).buckets,
        vec![held(DEV, T0 + 63_000, 4), held(SHARED, T0 + 70_010, 5)],
        "  subscribes with device v4, shared v5"
    );

    hprintln!("# the USB link drops: back off, then resubscribe with the held versions");
    d.now = 80_000;
    d.app.link_down(d.now);
    d.poll();
    d.nothing_to_send(c, "backing off after the link dropped");
    let wake = d.app.wake_at().unwrap_or(0);
    check!(
        c,
        wake > d.now && wake <= d.now + BACKOFF_MS,
        "  resubscribe due within the first back-off (at {} ms)",
        wake
    );
    d.now = wake - 1;
    d.poll();
    d.nothing_to_send(c, "one ms before the back-off ends");
    d.now = wake;
    d.poll();
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_subscribe(c, &sub).buckets,
        vec![held(DEV, T0 + 63_000, 4), held(SHARED, T0 + 70_010, 5)],
        "  resubscribes with device v4, shared v5"
    );
    let first = wake - 80_000;
    d.app.transport_failed(d.now, &sub);
    d.poll();
    let wake2 = d.app.wake_at().unwrap_or(0);
    check!(
        c,
        wake2 - d.now > first && wake2 - d.now <= 2 * BACKOFF_MS,
        "  a second failure (connection reset) waits longer: {} ms after {} ms",
        wake2 - d.now,
        first
    );
    d.now = wake2;
    d.poll();
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    hprintln!("# the hold runs out: the server answers an empty list");
    d.now += HOLD_MS;
    let ev = d.answer(
        c,
        &sub,
        &Recorded::pb(200, BucketList::default().encode_pb()),
    );
    check!(c, ev.is_empty(), "  no change");
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check!(
        c,
        d.app.wake_at().is_none(),
        "  resubscribed at once, no back-off pending"
    );
    hprintln!("# an answer that is not protobuf is a failed exchange, not a crash");
    let bad = d.app.answer(
        d.now,
        &sub,
        Reply {
            status: 200,
            content_type: Some("text/html"),
            set_credentials: None,
            retry_after: None,
            content_range: None,
            body: b"<html>captive portal</html>",
        },
    );
    check!(
        c,
        bad.is_err(),
        "  200 text/html to a subscribe is rejected: {}",
        bad.err().map(|b| alloc::format!("{b}")).unwrap_or_default()
    );
    d.poll();
    d.nothing_to_send(c, "backing off after the bad answer");
    let snapshot = d.app.client().snapshot();
    let written = d.records_written;
    check!(
        c,
        written >= 6,
        "  {} flash records written so far",
        written
    );
    drop(d);

    hprintln!("# boot 2: restore from flash, register, subscribe straight away");
    let mut d = Device::boot(c, 0, NONCE_2);
    check_eq!(
        c,
        d.app.client().snapshot(),
        snapshot,
        "  buckets restored with their versions and values"
    );
    let t = &d.app.thermostat;
    check_eq!(
        c,
        (t.target, t.mode.as_deref(), t.name.as_deref()),
        (Some(22.0), Some("cool"), Some("Living room")),
        "  thermostat settings restored before any network"
    );
    d.poll();
    let call = d.expect_call(c, Kind::Register, Method::Post, "/v1/register", ASSIGNED_ID);
    let ev = d.answer(c, &call, &Recorded::pb(200, register_answer().encode_pb()));
    check_eq!(
        c,
        ev,
        vec![Event::Registered],
        "  registered with the stored assigned credentials"
    );
    let mut creds = Vec::new();
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    check_eq!(
        c,
        decode_subscribe(c, &sub).buckets,
        vec![held(DEV, T0 + 63_000, 4), held(SHARED, T0 + 70_010, 5)],
        "  no fetch: subscribes with the stored versions"
    );
    // With diffs: only what changed since the stored v5 (the node's log reaches back).
    let note = list(vec![diff(
        SHARED,
        T0 + 900_000,
        6,
        5,
        json!({"target_temperature": 20.0, "mode": "heat"}),
    )]);
    let ev = d.answer(c, &sub, &Recorded::pb(200, note.encode_pb()));
    check_eq!(
        c,
        ev,
        vec![changed(SHARED, 6)],
        "  the change made while it was off arrives at once (shared v6)"
    );
    check_eq!(
        c,
        d.app.client().bucket(SHARED).map(|b| b.value.clone()),
        Some(fields(
            json!({"target_temperature": 20.0, "mode": "heat", "name": "Living room"})
        )),
        "  the diff applied to the held copy: the name kept, target and mode changed"
    );
    check_eq!(
        c,
        d.app.thermostat.target,
        Some(20.0),
        "  thermostat target 20.0"
    );
    hprintln!("# a user asks to pair: the pairing-code request preempts the held subscribe");
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    d.now = 5_000;
    d.app.request_pairing_code();
    d.poll();
    check!(
        c,
        d.app.preempts(Kind::Subscribe),
        "  the pairing-code request preempts the held subscribe"
    );
    d.app.hung_up(d.now, &sub);
    d.poll();
    let call = d.expect_call(
        c,
        Kind::PairingCode,
        Method::Post,
        "/v1/pairing-code",
        ASSIGNED_ID,
    );
    check!(
        c,
        call.body.is_none(),
        "  POST /v1/pairing-code carries no body"
    );
    let code = PairingCodeResponse {
        code: "7Q4K-92XD".into(),
        expires_in_s: 600,
    };
    let ev = d.answer(c, &call, &Recorded::pb(200, code.encode_pb()));
    check_eq!(
        c,
        ev,
        vec![Event::PairingCode {
            code: "7Q4K-92XD".into(),
            expires_in_s: 600
        }],
        "  event PairingCode 7Q4K-92XD, 600 s (shown to the user)"
    );
    hprintln!("# the server revokes the assigned credentials (401): back to the default set");
    let sub = d.expect_call(
        c,
        Kind::Subscribe,
        Method::Post,
        "/v1/subscribe",
        ASSIGNED_ID,
    );
    let ev = d.answer(
        c,
        &sub,
        &Recorded::json_error(401, "unauthorized", "unknown or revoked credentials"),
    );
    check_eq!(
        c,
        ev,
        vec![Event::CredentialsDropped {
            id: ASSIGNED_ID.into()
        }],
        "  event CredentialsDropped"
    );
    let stored = block_on(d.store.load(KEY_CREDENTIALS, &mut creds));
    check_eq!(
        c,
        (stored, record::decode_credentials(&creds)),
        (Ok(true), Ok(None)),
        "  the credentials record in flash now says: none"
    );
    d.now = d.app.wake_at().unwrap_or(0);
    d.poll();
    d.expect_call(
        c,
        Kind::Register,
        Method::Post,
        "/v1/register",
        "d.01AA02AB.k1",
    );
    hprintln!(
        "    heap in use at the end: {} bytes of {}",
        HEAP.used(),
        HEAP_SIZE
    );
}

/// The URLs the driver connects to: configured, allocated by registration, redirected.
fn urls(c: &mut Checks) {
    hprintln!("# URL handling of the driver");
    let t = split_url("http://10.42.0.1:8080/v1/buckets?view=full&ids=device.01AA02AB");
    check_eq!(
        c,
        t,
        Some(Target {
            tls: false,
            host: "10.42.0.1",
            authority: "10.42.0.1:8080",
            port: 8080,
            path: "/v1/buckets?view=full&ids=device.01AA02AB",
        }),
        "http URL with port and query"
    );
    let t = split_url("https://sync-3.tether.example/v1/subscribe");
    check_eq!(
        c,
        t.map(|t| (t.tls, t.host, t.port, t.path)),
        Some((true, "sync-3.tether.example", 443, "/v1/subscribe")),
        "https URL defaults to port 443"
    );
    check_eq!(
        c,
        split_url("https://h").map(|t| t.path),
        Some("/"),
        "bare host means path /"
    );
    for bad in [
        "ftp://h/x",
        "http://:80/x",
        "http://u@h/x",
        "http://h:99999/x",
        "h/x",
    ] {
        check_eq!(c, split_url(bad), None, "{} is refused", bad);
    }
}

#[entry]
fn main() -> ! {
    {
        use core::mem::MaybeUninit;
        static mut HEAP_MEM: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
        // Called once, before anything allocates.
        unsafe { HEAP.init(core::ptr::addr_of_mut!(HEAP_MEM) as usize, HEAP_SIZE) }
    }
    hprintln!("tether firmware QEMU test: recorded thermostat exchange on Cortex-M4");
    let mut c = Checks {
        passed: 0,
        failed: 0,
    };
    scenario(&mut c);
    urls(&mut c);
    firmware_update(&mut c);
    firmware_refused(&mut c);
    hprintln!("qemu-test: {} passed, {} failed", c.passed, c.failed);
    debug::exit(if c.failed == 0 {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    hprintln!("qemu-test: PANIC: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}
