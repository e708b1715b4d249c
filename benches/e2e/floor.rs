//! The floor: what the hardware and the protocols cost before pointgate adds anything,
//! measured in the same run against the same broker, simulator and disk.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A bare MQTT QoS 1 round: publish → the subscriber receives it, and publish → PUBACK.
/// Returns (one hop to a subscriber, PUBACK) in ms, `n` sequential rounds.
pub async fn mqtt(port: u16, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let topic = "bench/floor/qos1";
    let connect = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        AsyncClient::new(o, 64)
    };
    let (sub, mut sub_loop) = connect("bench-floor-sub");
    let (publ, mut pub_loop) = connect("bench-floor-pub");
    let (recv_tx, mut recv_rx) = mpsc::unbounded_channel::<Instant>();
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Instant>();
    let (subacked_tx, mut subacked_rx) = mpsc::unbounded_channel::<()>();
    let sub_task = tokio::spawn(async move {
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub.try_subscribe(topic, QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subacked_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    let _ = recv_tx.send(Instant::now());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let pub_task = tokio::spawn(async move {
        loop {
            match pub_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    let _ = ack_tx.send(Instant::now());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subacked_rx.recv())
        .await
        .context("floor subscriber: no SUBACK")?;
    let mut hop = Vec::with_capacity(n);
    let mut puback = Vec::with_capacity(n);
    let warmup = 20;
    for i in 0..n + warmup {
        let t0 = Instant::now();
        publ.publish(topic, QoS::AtLeastOnce, false, vec![b'x'; 120])
            .await
            .context("floor publish")?;
        let r = tokio::time::timeout(Duration::from_secs(5), recv_rx.recv()).await;
        let a = tokio::time::timeout(Duration::from_secs(5), ack_rx.recv()).await;
        let (Ok(Some(r)), Ok(Some(a))) = (r, a) else {
            bail!("floor MQTT round {i} timed out");
        };
        if i >= warmup {
            hop.push(ms(r - t0));
            puback.push(ms(a - t0));
        }
    }
    sub_task.abort();
    pub_task.abort();
    Ok((hop, puback))
}

/// A rustls reqwest client that trusts the simulator's CA, as the agent's does.
pub fn https_client(ca_pem: &str) -> Result<reqwest::Client> {
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.context("sim CA")?)?;
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .https_only(true)
        .build()
        .context("reqwest client")
}

/// A bare HTTPS GET on one kept-alive rustls connection to the simulator, in ms.
pub async fn https(
    base_url: &str,
    ca_pem: &str,
    token: &str,
    path: &str,
    n: usize,
) -> Result<Vec<f64>> {
    let client = https_client(ca_pem)?;
    let url = format!("{base_url}{path}");
    let mut out = Vec::with_capacity(n);
    let warmup = 20;
    for i in 0..n + warmup {
        let t0 = Instant::now();
        let resp = client
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .context("floor HTTPS GET")?;
        let _ = resp.bytes().await.context("floor HTTPS body")?;
        if i >= warmup {
            out.push(ms(t0.elapsed()));
        }
    }
    Ok(out)
}

/// Writes a 200-byte record and `fdatasync`s it, `n` times, in `dir`; in ms.
pub fn fdatasync(dir: &Path, n: usize) -> Result<Vec<f64>> {
    let path = dir.join("bench-fdatasync-floor");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let record = [b'r'; 200];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 10 {
        let t0 = Instant::now();
        f.write_all(&record)?;
        f.sync_data()?;
        if i >= 10 {
            out.push(ms(t0.elapsed()));
        }
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(out)
}

/// Spawn → exit of `pointgate --version`: what starting any process of this binary costs.
pub fn exec(bin: &Path, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let st = std::process::Command::new(bin)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()?;
        if !st.success() {
            bail!("{} --version failed", bin.display());
        }
        out.push(ms(t0.elapsed()));
    }
    Ok(out)
}
