//! Tether thermostat firmware for the nRF52840 (embassy).
//!
//! A thin driver around `tether_device::app::App` (which wraps the shared sans-IO
//! `DeviceClient`): the nRF52840 appears to its host as a USB Ethernet adapter (CDC-NCM),
//! embassy-net runs DHCP/DNS/TCP over it, reqwless speaks HTTP/1.1 (HTTPS through
//! embedded-tls with the `tls` feature) with protobuf bodies, sequential-storage keeps the
//! held buckets and assigned credentials in the NVMC's last four pages, the TEMP
//! peripheral is the thermometer, LED1 is the heating/cooling output, and button 1 asks
//! for a pairing code (held 10 s: factory reset). A signed firmware update offered at
//! registration is downloaded into embassy-boot's DFU partition, checked (SHA-256, the
//! Ed25519 signature against the key built in) and swapped in by the bootloader.
//!
//! Every decision is in `tether-device`, which the QEMU test (`qemu-test/`) exercises; this
//! file only moves bytes, reads the clock and touches peripherals.
#![no_std]
#![no_main]

extern crate alloc;

mod config;

use alloc::string::String;
use alloc::vec::Vec;
use core::pin::pin;

use core::cell::RefCell;
use defmt::{error, info, warn};
use defmt_rtt as _;

use embassy_boot::{BlockingFirmwareUpdater, FirmwareUpdaterConfig};
use embassy_embedded_hal::adapter::BlockingAsync;
use embassy_embedded_hal::flash::partition::BlockingPartition;
use embassy_executor::Spawner;
use embassy_futures::select::{select, select4, Either, Either4};
use embassy_net::dns::DnsQueryType;
use embassy_net::tcp::TcpSocket;
use embassy_net::{Stack, StackResources};
use embassy_nrf::gpio::{Input, Level, Output, OutputDrive, Pull};
use embassy_nrf::nvmc::Nvmc;
use embassy_nrf::rng::Rng;
use embassy_nrf::temp::Temp;
use embassy_nrf::usb::vbus_detect::HardwareVbusDetect;
use embassy_nrf::usb::Driver;
use embassy_nrf::{bind_interrupts, pac, peripherals, rng, temp, usb};
use embassy_sync::blocking_mutex::raw::{CriticalSectionRawMutex, NoopRawMutex};
use embassy_sync::blocking_mutex::Mutex;
use embassy_sync::signal::Signal;
use embassy_time::{with_timeout, Duration, Instant, Timer};
use embassy_usb::class::cdc_ncm::embassy_net::{Device, Runner, State as NetState};
use embassy_usb::class::cdc_ncm::{CdcNcmClass, State};
use embassy_usb::{Builder, UsbDevice};
use embedded_alloc::LlffHeap as Heap;
use embedded_io::ErrorKind;
use embedded_io_async::{Read, Write};
use panic_probe as _;
use reqwless::client::HttpConnection;
use reqwless::request::{Method as HttpMethod, Request, RequestBuilder};
use static_cell::StaticCell;

use tether_device::app::{App, Config, Reply};
use tether_device::dfu;
use tether_device::http::{split_url, HttpCall, Method, PROTOBUF};
use tether_device::store::{Store, KEY_BUCKETS, KEY_CREDENTIALS};
use tether_device::thermostat::Hvac;
use tether_proto::client::Event;
use tether_proto::credentials::SET_CREDENTIALS_HEADER;
use tether_proto::Millis;

bind_interrupts!(struct Irqs {
    USBD => usb::InterruptHandler<peripherals::USBD>;
    CLOCK_POWER => usb::vbus_detect::InterruptHandler;
    RNG => rng::InterruptHandler<peripherals::RNG>;
    TEMP => temp::InterruptHandler;
});

#[global_allocator]
static HEAP: Heap = Heap::empty();
/// The client's buckets, outbox and messages: the QEMU test's whole replay (its own
/// fixtures included) peaks under 9 KB.
const HEAP_SIZE: usize = 11 * 1024;

type UsbDriver = Driver<'static, HardwareVbusDetect>;
/// Ethernet frames over CDC-NCM.
const MTU: usize = 1514;
/// Frames queued between USB and the IP stack: two inbound (a TCP segment may arrive
/// while the previous one is processed), one outbound (the device sends little).
const NCM_RX: usize = 2;
const NCM_TX: usize = 1;

/// The last four 4 KB pages of the nRF52840's flash (kept out of `memory/nrf52840.x`'s partitions).
const STORAGE_RANGE: core::ops::Range<u32> = 0x000F_C000..0x0010_0000;
/// The active partition's size (`memory/nrf52840.x` FLASH): the largest image an update may be.
const ACTIVE_SIZE: u32 = 288 * 1024;

/// The NVMC (blocking), shared by the records' storage and the firmware updater's
/// partitions.
type Flash = Mutex<NoopRawMutex, RefCell<Nvmc<'static>>>;
type FlashPart = BlockingPartition<'static, NoopRawMutex, Nvmc<'static>>;

/// TCP buffers of the one connection (the device sends and receives a few hundred bytes
/// per exchange; a small window only slows the TLS handshake's certificate flight).
const TCP_TX: usize = 1024;
const TCP_RX: usize = 1536;
/// Response headers and body of one exchange.
const HTTP_RX: usize = 2048;
/// A TLS record as large as the device accepts: 4 KB of plaintext plus overhead. The
/// ClientHello asks for it (max_fragment_length 2^12); servers that ignore that extension
/// (rustls) must be configured to send records no larger (README, "TLS").
#[cfg(feature = "tls")]
const TLS_RX: usize = 4096 + 256;
/// What the device writes (a ClientHello, a request of a few hundred bytes) per record.
#[cfg(feature = "tls")]
const TLS_TX: usize = 2048;
/// The server certificate kept for checking its CertificateVerify signature.
#[cfg(feature = "tls")]
const CERT_SIZE: usize = 2048;

/// A temperature reading (°C) from the sensor task.
static MEASURED: Signal<CriticalSectionRawMutex, f32> = Signal::new();
/// What button 1 asked for.
static BUTTON: Signal<CriticalSectionRawMutex, Button> = Signal::new();
/// An `X-Tether-Set-Credentials` value seen in a response's headers, before its body.
static CREDENTIALS_SEEN: Signal<CriticalSectionRawMutex, String> = Signal::new();

#[derive(Clone, Copy)]
enum Button {
    /// A short press: show a pairing code.
    Pair,
    /// Held for 10 s: forget the assigned credentials and the buckets.
    FactoryReset,
}

/// The buffers of the one HTTP connection, in static RAM (counted by the CI budget).
struct HttpBuffers {
    tcp_rx: [u8; TCP_RX],
    tcp_tx: [u8; TCP_TX],
    rx: [u8; HTTP_RX],
    #[cfg(feature = "tls")]
    tls_rx: [u8; TLS_RX],
    #[cfg(feature = "tls")]
    tls_tx: [u8; TLS_TX],
}

/// What one exchange brought back.
struct Answer {
    status: u16,
    content_type: Option<String>,
    set_credentials: Option<String>,
    retry_after: Option<String>,
    content_range: Option<String>,
    body: Vec<u8>,
}

/// Why an exchange has no answer (reported to the client as a transport failure).
#[derive(defmt::Format)]
enum Failure {
    /// Not an http(s) URL (a bad configuration or registration answer).
    Url,
    /// The name did not resolve.
    Dns,
    /// TCP connect failed.
    Connect,
    /// The HTTP exchange failed.
    Http(reqwless::Error),
    /// The TLS handshake failed.
    #[cfg(feature = "tls")]
    Tls(embedded_tls::TlsError),
    /// An https URL without a CA to check the server against (and not built insecure).
    #[cfg(feature = "tls")]
    NoTrustAnchor,
    /// An https URL in a build without the `tls` feature.
    #[cfg(not(feature = "tls"))]
    NoTls,
}

/// The connection under HTTP: plain TCP or TLS over it, one type for reqwless. It lives
/// in the exchange future either way, so boxing the larger variant would only move it.
#[allow(clippy::large_enum_variant)]
enum Conn<'a> {
    Plain(TcpSocket<'a>),
    #[cfg(feature = "tls")]
    Tls(embedded_tls::TlsConnection<'a, TcpSocket<'a>, embedded_tls::Aes128GcmSha256>),
}

impl embedded_io::ErrorType for Conn<'_> {
    type Error = ErrorKind;
}

impl Read for Conn<'_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        use embedded_io::Error as _;
        match self {
            Conn::Plain(s) => s.read(buf).await.map_err(|e| e.kind()),
            #[cfg(feature = "tls")]
            Conn::Tls(t) => t.read(buf).await.map_err(|e| e.kind()),
        }
    }
}

impl Write for Conn<'_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        use embedded_io::Error as _;
        match self {
            Conn::Plain(s) => s.write(buf).await.map_err(|e| e.kind()),
            #[cfg(feature = "tls")]
            Conn::Tls(t) => t.write(buf).await.map_err(|e| e.kind()),
        }
    }

    async fn flush(&mut self) -> Result<(), ErrorKind> {
        use embedded_io::Error as _;
        match self {
            Conn::Plain(s) => s.flush().await.map_err(|e| e.kind()),
            #[cfg(feature = "tls")]
            Conn::Tls(t) => t.flush().await.map_err(|e| e.kind()),
        }
    }
}

/// embedded-tls's crypto: a CSPRNG seeded from the hardware RNG per connection, and the
/// server certificate checked against the configured CA (or, insecure builds, not at all).
#[cfg(feature = "tls")]
struct Crypto<'a> {
    rng: rand_chacha::ChaCha20Rng,
    verifier: Option<
        embedded_tls::pki::CertVerifier<
            'a,
            embedded_tls::Aes128GcmSha256,
            embedded_tls::NoClock,
            CERT_SIZE,
        >,
    >,
}

#[cfg(feature = "tls")]
impl embedded_tls::CryptoProvider for Crypto<'_> {
    type CipherSuite = embedded_tls::Aes128GcmSha256;
    /// No client certificate: the device authenticates with HTTP Basic credentials.
    type Signature = [u8; 64];

    fn rng(&mut self) -> impl embedded_tls::CryptoRngCore {
        &mut self.rng
    }

    fn verifier(
        &mut self,
    ) -> Result<&mut impl embedded_tls::TlsVerifier<Self::CipherSuite>, embedded_tls::TlsError>
    {
        self.verifier
            .as_mut()
            .ok_or(embedded_tls::TlsError::Unimplemented)
    }
}

fn now() -> Millis {
    Instant::now().as_millis()
}

#[embassy_executor::task]
async fn usb_task(mut device: UsbDevice<'static, UsbDriver>) -> ! {
    device.run().await
}

#[embassy_executor::task]
async fn usb_ncm_task(class: Runner<'static, UsbDriver, MTU>) -> ! {
    class.run().await
}

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, Device<'static, MTU>>) -> ! {
    runner.run().await
}

/// Reads the die temperature every `MEASURE_INTERVAL_S` (a real thermostat would read an
/// external sensor; the TEMP peripheral has the same 0.25 °C resolution).
#[embassy_executor::task]
async fn temp_task(mut temp: Temp<'static>) -> ! {
    loop {
        let t = temp.read().await;
        MEASURED.signal(t.to_num::<f32>());
        Timer::after_secs(config::MEASURE_INTERVAL_S).await;
    }
}

/// Button 1 (active low): a press asks for a pairing code, 10 s held resets.
#[embassy_executor::task]
async fn button_task(mut button: Input<'static>) -> ! {
    loop {
        button.wait_for_falling_edge().await;
        let held = with_timeout(Duration::from_secs(10), button.wait_for_high()).await;
        BUTTON.signal(if held.is_ok() {
            Button::Pair
        } else {
            Button::FactoryReset
        });
        button.wait_for_high().await;
    }
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    {
        use core::mem::MaybeUninit;
        static mut HEAP_MEM: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
        // Once, before anything allocates.
        unsafe { HEAP.init(core::ptr::addr_of_mut!(HEAP_MEM) as usize, HEAP_SIZE) }
    }
    let p = embassy_nrf::init(Default::default());
    info!(
        "tether firmware {} for {}",
        config::SW_VERSION,
        config::SERIAL
    );

    // USB needs the external high-frequency crystal.
    pac::CLOCK.tasks_hfclkstart().write_value(1);
    while pac::CLOCK.events_hfclkstarted().read() != 1 {}

    // USB: one CDC-NCM function, so the host sees an Ethernet adapter.
    let driver = Driver::new(p.USBD, Irqs, HardwareVbusDetect::new(Irqs));
    let mut usb_config = embassy_usb::Config::new(0xc0de, 0xcafe);
    usb_config.manufacturer = Some("Tether");
    usb_config.product = Some("Tether thermostat");
    usb_config.serial_number = Some(config::SERIAL);
    usb_config.max_power = 100;
    usb_config.max_packet_size_0 = 64;
    static CONFIG_DESC: StaticCell<[u8; 128]> = StaticCell::new();
    static BOS_DESC: StaticCell<[u8; 64]> = StaticCell::new();
    static CONTROL_BUF: StaticCell<[u8; 128]> = StaticCell::new();
    let mut builder = Builder::new(
        driver,
        usb_config,
        &mut CONFIG_DESC.init([0; 128])[..],
        &mut BOS_DESC.init([0; 64])[..],
        &mut [],
        &mut CONTROL_BUF.init([0; 128])[..],
    );
    // Locally administered MACs: the device's and the one the host's adapter takes.
    let our_mac = [0x02, 0x7e, 0x7e, 0x00, 0x00, 0x01];
    let host_mac = [0x02, 0x7e, 0x7e, 0x00, 0x00, 0x02];
    static NCM_STATE: StaticCell<State> = StaticCell::new();
    let class = CdcNcmClass::new(&mut builder, NCM_STATE.init(State::new()), host_mac, 64);
    let usb = builder.build();
    spawner.spawn(usb_task(usb).expect("usb task"));
    static NET_STATE: StaticCell<NetState<MTU, NCM_RX, NCM_TX>> = StaticCell::new();
    let (runner, device) = class
        .into_embassy_net_device::<MTU, NCM_RX, NCM_TX>(NET_STATE.init(NetState::new()), our_mac);
    spawner.spawn(usb_ncm_task(runner).expect("ncm task"));

    let mut rng = Rng::new(p.RNG, Irqs);
    let mut seed = [0u8; 24];
    rng.blocking_fill_bytes(&mut seed);
    let net_seed = u64::from_le_bytes(seed[..8].try_into().unwrap_or_default());
    let jitter_seed = u64::from_le_bytes(seed[8..16].try_into().unwrap_or_default());
    // Op ids must never repeat across boots: a fresh random nonce each time.
    let op_id_nonce = u64::from_le_bytes(seed[16..].try_into().unwrap_or_default());

    // DHCP for address, gateway and DNS; DNS, TCP and the DHCP socket.
    static RESOURCES: StaticCell<StackResources<3>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        device,
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        net_seed,
    );
    spawner.spawn(net_task(runner).expect("net task"));
    spawner.spawn(temp_task(Temp::new(p.TEMP, Irqs)).expect("temp task"));
    spawner.spawn(button_task(Input::new(p.P0_11, Pull::Up)).expect("button task"));
    // LED1 of the nRF52840-DK, active low: lit while heating or cooling.
    let mut led = Output::new(p.P0_13, Level::High, OutputDrive::Standard);

    static FLASH: StaticCell<Flash> = StaticCell::new();
    let flash: &'static Flash = FLASH.init(Mutex::new(RefCell::new(Nvmc::new(p.NVMC))));
    let storage = BlockingPartition::new(
        flash,
        STORAGE_RANGE.start,
        STORAGE_RANGE.end - STORAGE_RANGE.start,
    );
    let mut store = Store::new(
        BlockingAsync::new(storage),
        0..STORAGE_RANGE.end - STORAGE_RANGE.start,
    );
    // embassy-boot's partitions, from memory/nrf52840.x; the state needs a write-size buffer.
    static ALIGNED: StaticCell<[u8; 4]> = StaticCell::new();
    let mut updater = BlockingFirmwareUpdater::new(
        FirmwareUpdaterConfig::from_linkerfile_blocking(flash, flash),
        ALIGNED.init([0; 4]),
    );
    let mut booted_marked = false;
    let mut app = App::new(&Config {
        serial: config::SERIAL.into(),
        key_id: config::KEY_ID.into(),
        default_secret: config::DEFAULT_SECRET.into(),
        register_url: config::REGISTER_URL.into(),
        sw_version: config::SW_VERSION.into(),
        subscribe_timeout_ms: config::SUBSCRIBE_TIMEOUT_MS,
        backoff_initial_ms: config::BACKOFF_INITIAL_MS,
        backoff_max_ms: config::BACKOFF_MAX_MS,
        auth_backoff_max_ms: config::AUTH_BACKOFF_MAX_MS,
        jitter_seed,
        op_id_nonce,
        firmware_key: config::FIRMWARE_KEY.unwrap_or([0; 32]),
        // Without a firmware key built in, no image could be checked: no updates.
        update_capacity: if config::FIRMWARE_KEY.is_some() {
            ACTIVE_SIZE
        } else {
            0
        },
    });
    restore(&mut app, &mut store).await;

    static BUFFERS: StaticCell<HttpBuffers> = StaticCell::new();
    let bufs = BUFFERS.init(HttpBuffers {
        tcp_rx: [0; TCP_RX],
        tcp_tx: [0; TCP_TX],
        rx: [0; HTTP_RX],
        #[cfg(feature = "tls")]
        tls_rx: [0; TLS_RX],
        #[cfg(feature = "tls")]
        tls_tx: [0; TLS_TX],
    });

    let mut was_up = false;
    loop {
        // The link: USB unplugged, or the host's DHCP gone.
        if !stack.is_config_up() {
            if was_up {
                warn!("network down");
                app.link_down(now());
            }
            stack.wait_config_up().await;
            if let Some(c) = stack.config_v4() {
                info!("network up: {}", c.address);
            }
        }
        was_up = true;

        take_signals(&mut app);
        let events = app.poll(now());
        if !booted_marked && events.contains(&Event::Registered) {
            // This image reached the server: keep it (after a swap, the bootloader would
            // otherwise roll back at the next reset).
            booted_marked = true;
            // (Writes nothing when the state says so already.)
            if let Err(e) = updater.mark_booted() {
                error!("marking the firmware booted: {}", e);
            }
        }
        log_events(events);
        if let Some(news) = app.take_offer_news() {
            match news {
                tether_device::app::Offer::Downloading { version, size } => {
                    info!(
                        "firmware {=str}: downloading {} bytes",
                        version.as_str(),
                        size
                    )
                }
                tether_device::app::Offer::Declined(why) => {
                    warn!("firmware offer declined: {=str}", why)
                }
            }
        }
        persist(&mut app, &mut store).await;
        led.set_level(match app.thermostat.hvac() {
            Hvac::Heating | Hvac::Cooling => Level::Low,
            Hvac::Off | Hvac::Idle => Level::High,
        });

        let Some(call) = app.next_call(now()) else {
            // Nothing to send: wait for a back-off to end or something to happen.
            let wake = app.wake_at().map_or(Instant::MAX, Instant::from_millis);
            match select4(
                Timer::at(wake),
                MEASURED.wait(),
                BUTTON.wait(),
                stack.wait_config_down(),
            )
            .await
            {
                Either4::First(()) | Either4::Fourth(()) => {}
                Either4::Second(t) => app.measured(f64::from(t)),
                Either4::Third(b) => on_button(&mut app, b),
            }
            continue;
        };
        info!("{} {}", call.method.as_str(), call.url.as_str());
        // A fresh CSPRNG seed per TLS connection, from the hardware RNG.
        let mut tls_seed = [0u8; 32];
        rng.blocking_fill_bytes(&mut tls_seed);
        let timeout = Duration::from_millis(app.call_timeout_ms(call.kind));
        let result = {
            let exchange = pin!(with_timeout(
                timeout,
                exchange(stack, bufs, &call, tls_seed)
            ));
            drive(&mut app, &call, exchange).await
        };
        match result {
            Driven::Answered(Ok(Ok(answer))) => {
                info!("  -> {} ({} bytes)", answer.status, answer.body.len());
                let reply = Reply {
                    status: answer.status,
                    content_type: answer.content_type.as_deref(),
                    set_credentials: answer.set_credentials.as_deref(),
                    retry_after: answer.retry_after.as_deref(),
                    content_range: answer.content_range.as_deref(),
                    body: &answer.body,
                };
                if call.kind == tether_device::http::Kind::Firmware {
                    update_firmware(&mut app, &mut updater, reply);
                } else if let Err(bad) = app.answer(now(), &call, reply) {
                    warn!(
                        "  {} answer {} not accepted: {=str}",
                        bad.kind.name(),
                        bad.status,
                        bad.reason
                    );
                }
            }
            Driven::Answered(Ok(Err(e))) => {
                warn!("  failed: {}", e);
                app.transport_failed(now(), &call);
            }
            Driven::Answered(Err(_)) => {
                warn!("  timed out");
                app.transport_failed(now(), &call);
            }
            Driven::HungUp => {
                info!("  subscribe hung up for a local change");
                app.hung_up(now(), &call);
            }
        }
    }
}

/// Stores a firmware range's bytes; after the last one, checks the image, marks it for the
/// swap and resets into the bootloader.
fn update_firmware(
    app: &mut App,
    updater: &mut BlockingFirmwareUpdater<'static, FlashPart, FlashPart>,
    reply: Reply<'_>,
) {
    let Some(chunk) = app.firmware_answer(now(), reply) else {
        return;
    };
    let stored = dfu::store(updater, &chunk);
    if let Err(e) = &stored {
        error!("writing the update partition: {}", e);
    }
    let Some(image) = app.firmware_stored(now(), &chunk, stored.is_ok()) else {
        return;
    };
    let checked = dfu::check_and_mark(updater, &image, app.firmware_key());
    app.firmware_checked(checked);
    match checked {
        Ok(()) => {
            info!(
                "firmware {=str} checked and marked: resetting into the bootloader",
                image.version.as_str()
            );
            cortex_m::peripheral::SCB::sys_reset();
        }
        Err(why) => error!(
            "firmware {=str} refused: {=str}",
            image.version.as_str(),
            why.name()
        ),
    }
}

/// How a call in flight ended.
enum Driven {
    /// The exchange finished (or timed out).
    Answered(Result<Result<Answer, Failure>, embassy_time::TimeoutError>),
    /// A held subscribe was hung up for a waiting PUT.
    HungUp,
}

/// Waits for `exchange` while handling what happens meanwhile: measurements, buttons and
/// credentials seen in headers go to the app at once, and a held subscribe is hung up as
/// soon as the app has a PUT (or pairing request) waiting.
async fn drive<F>(app: &mut App, call: &HttpCall, mut exchange: core::pin::Pin<&mut F>) -> Driven
where
    F: core::future::Future<Output = Result<Result<Answer, Failure>, embassy_time::TimeoutError>>,
{
    loop {
        let wake = app.wake_at().map_or(Instant::MAX, Instant::from_millis);
        let side = select4(
            MEASURED.wait(),
            BUTTON.wait(),
            CREDENTIALS_SEEN.wait(),
            Timer::at(wake),
        );
        match select(exchange.as_mut(), side).await {
            Either::First(r) => return Driven::Answered(r),
            Either::Second(Either4::First(t)) => app.measured(f64::from(t)),
            Either::Second(Either4::Second(b)) => on_button(app, b),
            Either::Second(Either4::Third(c)) => app.offered_credentials(&c),
            Either::Second(Either4::Fourth(())) => {}
        }
        log_events(app.poll(now()));
        if app.preempts(call.kind) {
            return Driven::HungUp;
        }
    }
}

/// One HTTP exchange for `call` on a fresh connection (TLS for `https://`).
async fn exchange(
    stack: Stack<'static>,
    bufs: &mut HttpBuffers,
    call: &HttpCall,
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))] tls_seed: [u8; 32],
) -> Result<Answer, Failure> {
    let target = split_url(&call.url).ok_or(Failure::Url)?;
    let addr = *stack
        .dns_query(target.host, DnsQueryType::A)
        .await
        .map_err(|_| Failure::Dns)?
        .first()
        .ok_or(Failure::Dns)?;
    let mut socket = TcpSocket::new(stack, &mut bufs.tcp_rx, &mut bufs.tcp_tx);
    socket.set_timeout(Some(Duration::from_secs(30)));
    socket
        .connect((addr, target.port))
        .await
        .map_err(|_| Failure::Connect)?;

    let conn = if target.tls {
        #[cfg(feature = "tls")]
        {
            use embedded_tls::{
                Certificate, MaxFragmentLength, TlsConfig, TlsConnection, TlsContext,
            };
            use rand_core::SeedableRng;
            let verifier = if !config::CA_DER.is_empty() {
                Some(embedded_tls::pki::CertVerifier::new(Certificate::X509(
                    config::CA_DER,
                )))
            } else if config::tls_insecure() {
                None
            } else {
                return Err(Failure::NoTrustAnchor);
            };
            let crypto = Crypto {
                rng: rand_chacha::ChaCha20Rng::from_seed(tls_seed),
                verifier,
            };
            let tls_config = TlsConfig::new()
                .with_server_name(target.host)
                .with_max_fragment_length(MaxFragmentLength::Bits12);
            let mut tls = TlsConnection::new(socket, &mut bufs.tls_rx, &mut bufs.tls_tx);
            let context = TlsContext::new(&tls_config, crypto);
            tls.open(context).await.map_err(Failure::Tls)?;
            Conn::Tls(tls)
        }
        #[cfg(not(feature = "tls"))]
        return Err(Failure::NoTls);
    } else {
        Conn::Plain(socket)
    };

    let method = match call.method {
        Method::Get => HttpMethod::GET,
        Method::Post => HttpMethod::POST,
        Method::Put => HttpMethod::PUT,
    };
    let api = [("Content-Type", PROTOBUF), ("Accept", PROTOBUF)];
    let ranged;
    let headers: &[(&str, &str)] = match &call.range {
        Some(range) => {
            ranged = [("Range", range.as_str())];
            &ranged
        }
        None => &api,
    };
    let body: &[u8] = call.body.as_deref().unwrap_or(&[]);
    let request = Request::new(method, target.path)
        .host(target.authority)
        .basic_auth(&call.auth.id, &call.auth.secret)
        .headers(headers)
        .body(body)
        .build();
    let mut http = HttpConnection::Plain(conn);
    let response = http
        .send(request, &mut bufs.rx)
        .await
        .map_err(Failure::Http)?;
    let status = response.status.0;
    let (mut content_type, mut set_credentials, mut retry_after) = (None, None, None);
    let mut content_range = None;
    for (name, value) in response.headers() {
        let value = core::str::from_utf8(value).ok().map(String::from);
        if name.eq_ignore_ascii_case("content-type") {
            content_type = value;
        } else if name.eq_ignore_ascii_case("content-range") {
            content_range = value;
        } else if name.eq_ignore_ascii_case(SET_CREDENTIALS_HEADER) {
            set_credentials = value;
        } else if name.eq_ignore_ascii_case("retry-after") {
            retry_after = value;
        }
    }
    if let Some(c) = &set_credentials {
        // A held subscribe's body may come minutes later, or never (hung up).
        CREDENTIALS_SEEN.signal(c.clone());
    }
    let body = response
        .body()
        .read_to_end()
        .await
        .map_err(Failure::Http)?
        .to_vec();
    Ok(Answer {
        status,
        content_type,
        set_credentials,
        retry_after,
        content_range,
        body,
    })
}

fn on_button(app: &mut App, b: Button) {
    match b {
        Button::Pair => {
            info!("button: pairing code requested");
            app.request_pairing_code();
        }
        Button::FactoryReset => {
            warn!("button: factory reset");
            app.factory_reset();
        }
    }
}

/// Hands signals that arrived while no call was in flight to the app.
fn take_signals(app: &mut App) {
    if let Some(t) = MEASURED.try_take() {
        app.measured(f64::from(t));
    }
    if let Some(b) = BUTTON.try_take() {
        on_button(app, b);
    }
    if let Some(c) = CREDENTIALS_SEEN.try_take() {
        app.offered_credentials(&c);
    }
}

fn log_events(events: Vec<Event>) {
    for ev in events {
        match ev {
            Event::Registered => info!("registered"),
            Event::Redirected { url } => info!("redirected to {=str}", url.as_str()),
            Event::SoftwareUpdate(offer) => {
                info!(
                    "firmware {=str} offered at {=str}",
                    offer.version.as_str(),
                    offer.url.as_str()
                )
            }
            Event::BucketChanged { id, version } => info!("{=str} now v{}", id.as_str(), version),
            Event::ChangeAcked {
                id,
                outcome,
                version,
                replayed,
                ..
            } => {
                info!(
                    "change to {=str}: {=str} v{}{=str}",
                    id.as_str(),
                    outcome_name(outcome),
                    version,
                    if replayed { " (replayed)" } else { "" }
                )
            }
            Event::ChangeRejected { id, status } => {
                warn!("change to {=str} rejected: {}", id.as_str(), status)
            }
            Event::VersionRegression { id, held, received } => {
                warn!(
                    "{=str}: server sent v{} below held v{}",
                    id.as_str(),
                    received,
                    held
                )
            }
            Event::CredentialsStored { id } => info!("credentials {=str} stored", id.as_str()),
            Event::CredentialsIgnored { id } => warn!("credentials {=str} ignored", id.as_str()),
            Event::CredentialsDropped { id } => warn!("credentials {=str} dropped", id.as_str()),
            Event::DefaultCredentialsRejected => warn!("default credentials rejected"),
            Event::CredentialsMissing => warn!("registered without credentials; retrying"),
            Event::PairingCode { code, expires_in_s } => {
                info!(
                    "PAIRING CODE {=str} (valid {} s)",
                    code.as_str(),
                    expires_in_s
                )
            }
            Event::PairingFailed { status } => warn!("pairing code refused: {}", status),
        }
    }
}

fn outcome_name(o: tether_proto::api::UpdateOutcome) -> &'static str {
    match o {
        tether_proto::api::UpdateOutcome::Applied => "applied",
        tether_proto::api::UpdateOutcome::Merged => "merged",
        tether_proto::api::UpdateOutcome::Refused => "refused",
    }
}

/// Loads the flash records into the app at boot.
async fn restore(app: &mut App, store: &mut Store<BlockingAsync<FlashPart>>) {
    let mut buckets = Vec::new();
    let mut creds = Vec::new();
    let has_buckets = store.load(KEY_BUCKETS, &mut buckets).await;
    let has_creds = store.load(KEY_CREDENTIALS, &mut creds).await;
    if has_buckets.is_err() || has_creds.is_err() {
        error!("flash store unreadable; starting from scratch");
    }
    let restored = app.restore(
        matches!(has_buckets, Ok(true)).then_some(&buckets[..]),
        matches!(has_creds, Ok(true)).then_some(&creds[..]),
    );
    match restored {
        Ok(n) => info!("restored {} buckets from flash", n),
        Err(_) => warn!("flash record not restored: fetching afresh"),
    }
}

/// Writes the records the app says changed.
async fn persist(app: &mut App, store: &mut Store<BlockingAsync<FlashPart>>) {
    if let Some(r) = app.take_credentials_record() {
        if let Err(e) = store.save(KEY_CREDENTIALS, &r).await {
            error!("saving credentials: {}", e as u8);
        }
    }
    if let Some(r) = app.take_buckets_record() {
        if let Err(e) = store.save(KEY_BUCKETS, &r).await {
            error!("saving buckets: {}", e as u8);
        }
    }
}
