//! The gateway over TLS: agents verify it (a private CA here), cleartext and untrusted
//! certificates are refused, and a rotated certificate on disk serves new connections
//! without a restart while a bad write leaves the good one in force.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use edgewise_agent::GatewayTls;
use edgewise_agent::identity::Identity;
use edgewise_operator::gateway::tls::TlsFiles;
use edgewise_operator::gateway::{Change, GatewayConfig};
use edgewise_proto::fleet::fleet_client::FleetClient;
use edgewise_tests::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;

/// A CA that signs server certificates for loopback.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn pem(&self) -> Vec<u8> {
        self.issuer.pem().into_bytes()
    }

    /// A server certificate and key for 127.0.0.1 and localhost, written as the gateway's
    /// files (the key first: a rotation that writes both is what the reload must survive).
    fn issue_into(&self, files: &TlsFiles) {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        write_atomically(&files.key, key.serialize_pem().as_bytes());
        write_atomically(&files.cert, cert.pem().as_bytes());
    }
}

/// As a Secret mount changes: the new file renamed into place.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Enrolls a fresh identity over `url` trusting the gateway as `tls` says; the error
/// message when it cannot.
async fn enroll(url: &str, tls: &GatewayTls) -> Result<(), String> {
    let channel = edgewise_agent::gateway_channel(url, tls).map_err(|e| e.to_string())?;
    let id = Identity::ephemeral();
    let request = id.enroll_request(TOKEN, &facts("linux", "amd64", 4096, &[]), &BTreeMap::new());
    let mut client = FleetClient::new(channel);
    match tokio::time::timeout(Duration::from_secs(10), client.enroll(request)).await {
        Err(_) => Err("no answer within 10 s".into()),
        Ok(Err(status)) => Err(format!("{status:?}")),
        Ok(Ok(_)) => Ok(()),
    }
}

/// A harness gateway serving a certificate `ca` issued, from files in `dir` it re-reads
/// every 100 ms: the files, the harness and its `https://` URL.
async fn gateway_issued_by(ca: &TestCa, dir: &Path) -> (TlsFiles, Harness, String) {
    let files = TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        reload_every: Duration::from_millis(100),
    };
    ca.issue_into(&files);
    let h = Harness::start_with(GatewayConfig {
        tls: Some(files.clone()),
        ..GatewayConfig::default()
    })
    .await;
    let https = format!("https://{}", h.gateway_addr);
    (files, h, https)
}

fn trusting(ca: &TestCa) -> GatewayTls {
    GatewayTls {
        insecure: false,
        ca_pem: Some(ca.pem()),
        pins: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_verify_the_gateway_and_a_rotated_certificate_serves_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, second) = (TestCa::new("first CA"), TestCa::new("second CA"));
    let (files, h, https) = gateway_issued_by(&first, dir.path()).await;

    // An agent that trusts the gateway's CA enrolls and receives the fleet's policy.
    h.apply([Change::ApplyPolicy(routing_policy(
        "p",
        json!({"targets": [{"name": "d", "device": {"model": "m"}}], "default": {"route": "d"}}),
    ))]);
    let agent = TestAgent::start_with_tls(
        &dir.path().join("agent"),
        &https,
        &trusting(&first),
        facts("linux", "amd64", 4096, &[]),
    );
    eventually(Duration::from_secs(20), "the policy over TLS", || async {
        agent.device.policy.version()
    })
    .await;

    // Cleartext to a TLS gateway fails (at once, not by hanging); so does a client that
    // trusts another CA, and the system's roots (which do not hold a test CA).
    let cleartext = enroll(
        &format!("http://{}", h.gateway_addr),
        &GatewayTls::insecure(),
    )
    .await;
    assert!(cleartext.is_err(), "cleartext accepted by a TLS gateway");
    let other = enroll(&https, &trusting(&second)).await;
    assert!(
        other.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "an untrusted certificate accepted: {other:?}"
    );
    assert!(enroll(&https, &GatewayTls::default()).await.is_err());
    enroll(&https, &trusting(&first))
        .await
        .expect("the first CA is trusted");

    // A client on another TLS stack (grpcio, BoringSSL) verifies the same chain and gets
    // the gateway's own answer; trusting only its system roots, it cannot connect.
    let scratch = tempfile::tempdir().expect("scratch");
    std::fs::write(dir.path().join("ca.pem"), first.pem()).expect("ca file");
    let said = python_fixture(
        "grpcio_fleet_tls.py",
        &[
            h.gateway_addr.to_string(),
            dir.path().join("ca.pem").display().to_string(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto").to_owned(),
            scratch.path().display().to_string(),
        ],
    )
    .await;
    assert_eq!(said["trusting_ca"]["code"], "INVALID_ARGUMENT", "{said}");
    assert_eq!(
        said["trusting_ca"]["details"], "bootstrap_token is required",
        "{said}"
    );
    assert_eq!(said["system_roots"]["code"], "UNAVAILABLE", "{said}");

    // Rotation: the files now hold a certificate of the second CA. New connections get it
    // within the reload interval, without a restart; the first CA no longer verifies.
    second.issue_into(&files);
    eventually(
        Duration::from_secs(10),
        "the rotated certificate",
        || async { enroll(&https, &trusting(&second)).await.ok() },
    )
    .await;
    assert!(
        enroll(&https, &trusting(&first)).await.is_err(),
        "the old certificate is still served"
    );

    // A bad write (a certificate without its key, then garbage) is refused: the good
    // certificate stays in force.
    write_atomically(&files.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    enroll(&https, &trusting(&second))
        .await
        .expect("the last good certificate still serves");
    let stranger = KeyPair::generate().expect("key");
    write_atomically(&files.key, stranger.serialize_pem().as_bytes());
    tokio::time::sleep(Duration::from_millis(400)).await;
    enroll(&https, &trusting(&second))
        .await
        .expect("a key that is not the certificate's is not swapped in");

    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_certificate_cannot_load_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = TlsFiles {
        cert: dir.path().join("missing.crt"),
        key: dir.path().join("missing.key"),
        reload_every: Duration::from_secs(1),
    };
    let gateway = edgewise_operator::gateway::Gateway::new(
        GatewayConfig {
            tls: Some(files),
            credential_keys: credential_keys(),
            ..GatewayConfig::default()
        },
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::Config::builder()
                .behavior_version_latest()
                .region(aws_sdk_s3::config::Region::new("us-east-1"))
                .build(),
        ),
    );
    let err = gateway
        .spawn(loopback(), tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("no certificate, no gateway");
    assert!(err.to_string().contains("missing.crt"), "{err}");
}

/// The `sha256//<base64>` pin of the certificate in PEM file `cert`, made as curl's manual
/// says, with openssl: a tool we did not write defines what a pin is.
fn openssl_pin(cert: &Path) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -pubkey -noout -in \"$0\" | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | base64",
        )
        .arg(cert)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("sha256//{}", String::from_utf8_lossy(&out.stdout).trim())
}

/// `[tls] pins`: on top of chain verification, the chain must hold a pinned key. The CA's
/// pin survives a renewal (a new leaf key), the old leaf's pin does not, and a pin of a
/// key the gateway never presents fails the handshake naming the pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_key_must_be_in_the_gateways_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, stranger) = (TestCa::new("pinned CA"), TestCa::new("stranger CA"));
    let (files, _gateway, https) = gateway_issued_by(&ca, dir.path()).await;
    let (ca_pem, stranger_pem) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&ca_pem, ca.pem()).expect("ca");
    std::fs::write(&stranger_pem, stranger.pem()).expect("other");
    let pinned = |pins: &[&str]| GatewayTls {
        pins: pins
            .iter()
            .map(|p| edgewise_agent::pinning::parse_pin(p).expect("a pin"))
            .collect(),
        ..trusting(&ca)
    };
    let (ca_pin, leaf_pin, stranger_pin) = (
        openssl_pin(&ca_pem),
        openssl_pin(&files.cert),
        openssl_pin(&stranger_pem),
    );
    // Our reading of a certificate's key agrees with openssl's.
    assert_eq!(
        edgewise_agent::pinning::pin_of(ca.issuer.der()),
        Some(edgewise_agent::pinning::parse_pin(&ca_pin).expect("pin")),
    );
    enroll(&https, &pinned(&[&ca_pin]))
        .await
        .expect("the CA's key is pinned");
    enroll(&https, &pinned(&[&stranger_pin, &leaf_pin]))
        .await
        .expect("the leaf's key is pinned");
    let refused = enroll(&https, &pinned(&[&stranger_pin])).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("pinned")),
        "a chain without a pinned key accepted: {refused:?}"
    );

    // A renewal: a new leaf key from the same CA. The CA pin holds; the old leaf's does not.
    ca.issue_into(&files);
    eventually(
        Duration::from_secs(10),
        "the renewed certificate",
        || async { enroll(&https, &pinned(&[&leaf_pin])).await.err() },
    )
    .await;
    enroll(&https, &pinned(&[&ca_pin]))
        .await
        .expect("the CA pin survives the renewal");
}
