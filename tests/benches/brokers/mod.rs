//! The peers of the policy fan-out: Mosquitto (MQTT 3.1.1, QoS 1) and nats-server (core
//! NATS, each subscriber answering on the message's reply subject), both from Debian
//! packages that `scripts/bench` installs. Each subscriber is a device with its own TCP
//! connection, as devices have; it acknowledges the message the moment it has it (a
//! `PUBACK`, or a publish to the reply subject), the same step at which our agent applies
//! and ACKs a policy, and records when.
//!
//! The subscribers are lean on purpose: a full client per device (an `rumqttc` event loop,
//! an `async-nats` client) would spend the two shared cores on the bench's side and make
//! the broker look slower than it is. MQTT packets are encoded and decoded by `rumqttc`'s
//! codec; the NATS side speaks the few lines of its text protocol that a subscriber needs.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A broker the bench runs.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Mosquitto,
    Nats,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mosquitto => "Mosquitto 2 (MQTT QoS 1)",
            Kind::Nats => "nats-server 2 (reply per message)",
        }
    }
}

/// What one fan-out measured.
pub struct Measured {
    /// All subscribers connected and subscribed.
    pub connect: Duration,
    /// Publish → the last subscriber has the message and has acknowledged it.
    pub fanout: Duration,
    /// Broker RSS growth per connected subscriber, bytes.
    pub bytes_per_connection: f64,
}

/// When each subscriber got the message, as the latest offset from `base`.
struct Arrivals {
    base: Instant,
    count: AtomicUsize,
    last_ns: AtomicU64,
    ready: AtomicUsize,
}

impl Arrivals {
    fn arrived(&self) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_ns.fetch_max(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Release);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Starts `kind` on a free loopback port, configured for `n` connections.
fn start(kind: Kind, dir: &Path) -> (tokio::process::Child, SocketAddr) {
    let port = free_port();
    let mut command = match kind {
        Kind::Mosquitto => {
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nlog_dest none\nmax_inflight_messages 0\n"
                ),
            )
            .unwrap();
            let mut c = tokio::process::Command::new(which("mosquitto"));
            c.arg("-c").arg(conf);
            c
        }
        Kind::Nats => {
            let mut c = tokio::process::Command::new(which("nats-server"));
            c.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
            c
        }
    };
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/bench installs it)", kind.name()));
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Where a Debian package put `binary` (`/usr/sbin` is not on every PATH).
fn which(binary: &str) -> String {
    ["/usr/sbin", "/usr/bin", "/usr/local/bin"]
        .iter()
        .map(|d| format!("{d}/{binary}"))
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| binary.to_owned())
}

async fn connect_when_up(addr: SocketAddr) -> TcpStream {
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(addr).await {
            s.set_nodelay(true).unwrap();
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

/// `n` subscribers on `kind`, then one publish of `payload`: how long until the last has
/// it, and what each connection costs the broker.
pub async fn fanout(kind: Kind, n: usize, payload: &[u8]) -> Measured {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(kind, dir.path());
    let pid = child.id().unwrap();
    drop(connect_when_up(addr).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = edgewise_tests::proc_status_kib(pid, "VmRSS:");
    let arrivals = Arc::new(Arrivals {
        base: Instant::now(),
        count: AtomicUsize::new(0),
        last_ns: AtomicU64::new(0),
        ready: AtomicUsize::new(0),
    });
    let started = Instant::now();
    // Connect at most 256 at a time, as our fleet simulator's enrolment does in effect.
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (arrivals, gate) = (arrivals.clone(), gate.clone());
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            match kind {
                Kind::Mosquitto => mqtt_subscriber(addr, i, arrivals, permit).await,
                Kind::Nats => nats_subscriber(addr, arrivals, permit).await,
            }
        });
    }
    while arrivals.ready.load(Ordering::Acquire) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = edgewise_tests::proc_status_kib(pid, "VmRSS:");

    let publish_at = match kind {
        Kind::Mosquitto => mqtt_publish(addr, payload).await,
        Kind::Nats => nats_publish(addr, payload).await,
    };
    while arrivals.count.load(Ordering::Acquire) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let last = arrivals.base + Duration::from_nanos(arrivals.last_ns.load(Ordering::Relaxed));
    tasks.abort_all();
    let _ = child.kill().await;
    Measured {
        connect,
        fanout: last.saturating_duration_since(publish_at),
        bytes_per_connection: (loaded.saturating_sub(baseline) * 1024) as f64 / n as f64,
    }
}

/// The next MQTT packet off `stream`.
async fn mqtt_read(stream: &mut TcpStream, buf: &mut BytesMut) -> Packet {
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(packet) => return packet,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                assert!(stream.read_buf(buf).await.unwrap() > 0, "broker hung up");
            }
            Err(e) => panic!("MQTT: {e}"),
        }
    }
}

async fn mqtt_open(addr: SocketAddr, id: &str) -> (TcpStream, BytesMut) {
    let mut stream = connect_when_up(addr).await;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(id);
    connect.keep_alive = 0; // no pings during the bench
    connect.write(&mut out).unwrap();
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::with_capacity(512);
    match mqtt_read(&mut stream, &mut buf).await {
        Packet::ConnAck(_) => {}
        other => panic!("expected CONNACK, got {other:?}"),
    }
    (stream, buf)
}

async fn mqtt_subscriber(
    addr: SocketAddr,
    i: usize,
    arrivals: Arc<Arrivals>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (mut stream, mut buf) = mqtt_open(addr, &format!("device-{i}")).await;
    let mut out = BytesMut::new();
    let mut subscribe = Subscribe::new("fleet/policy", QoS::AtLeastOnce);
    subscribe.pkid = 1;
    subscribe.write(&mut out).unwrap();
    stream.write_all(&out).await.unwrap();
    match mqtt_read(&mut stream, &mut buf).await {
        Packet::SubAck(_) => {}
        other => panic!("expected SUBACK, got {other:?}"),
    }
    drop(permit);
    arrivals.ready.fetch_add(1, Ordering::Release);
    loop {
        if let Packet::Publish(p) = mqtt_read(&mut stream, &mut buf).await {
            out.clear();
            PubAck::new(p.pkid).write(&mut out).unwrap();
            stream.write_all(&out).await.unwrap();
            arrivals.arrived();
        }
    }
}

/// Publishes at QoS 1; when it was sent.
async fn mqtt_publish(addr: SocketAddr, payload: &[u8]) -> Instant {
    let (mut stream, mut buf) = mqtt_open(addr, "control-plane").await;
    let mut publish = Publish::new("fleet/policy", QoS::AtLeastOnce, payload.to_vec());
    publish.pkid = 1;
    let mut out = BytesMut::new();
    publish.write(&mut out).unwrap();
    let at = Instant::now();
    stream.write_all(&out).await.unwrap();
    // Drain the broker's PUBACK; the connection stays open while it delivers, and ends
    // quietly when the bench stops the broker.
    tokio::spawn(async move {
        while stream.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {
            buf.clear();
        }
    });
    at
}

/// A NATS connection that has subscribed to `subject` (confirmed by a PING's PONG).
async fn nats_open(addr: SocketAddr, subscribe: &str) -> BufReader<TcpStream> {
    let mut stream = BufReader::new(connect_when_up(addr).await);
    stream
        .get_mut()
        .write_all(
            format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {subscribe} 1\r\nPING\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stream.read_line(&mut line).await.unwrap() > 0,
            "nats hung up"
        );
        if line.starts_with("PONG") {
            return stream;
        }
        assert!(!line.starts_with("-ERR"), "{line}");
    }
}

async fn nats_subscriber(
    addr: SocketAddr,
    arrivals: Arc<Arrivals>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let mut stream = nats_open(addr, "fleet.policy").await;
    drop(permit);
    arrivals.ready.fetch_add(1, Ordering::Release);
    let mut line = String::new();
    let mut payload = Vec::new();
    loop {
        line.clear();
        assert!(
            stream.read_line(&mut line).await.unwrap() > 0,
            "nats hung up"
        );
        if line.starts_with("PING") {
            stream.get_mut().write_all(b"PONG\r\n").await.unwrap();
        } else if let Some(rest) = line.strip_prefix("MSG ") {
            // MSG <subject> <sid> <reply-to> <bytes>
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let len: usize = fields.last().unwrap().parse().unwrap();
            payload.resize(len + 2, 0);
            stream.read_exact(&mut payload).await.unwrap();
            let reply = fields[2];
            stream
                .get_mut()
                .write_all(format!("PUB {reply} 2\r\nok\r\n").as_bytes())
                .await
                .unwrap();
            arrivals.arrived();
        }
    }
}

/// Publishes with a reply subject the publisher listens on; when it was sent.
async fn nats_publish(addr: SocketAddr, payload: &[u8]) -> Instant {
    let mut stream = nats_open(addr, "acks.control-plane").await;
    let mut message =
        format!("PUB fleet.policy acks.control-plane {}\r\n", payload.len()).into_bytes();
    message.extend_from_slice(payload);
    message.extend_from_slice(b"\r\n");
    let at = Instant::now();
    stream.get_mut().write_all(&message).await.unwrap();
    // Drain the acknowledgements so the broker never blocks on this connection.
    tokio::spawn(async move {
        let mut sink = vec![0u8; 64 << 10];
        while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    at
}
