//! The `pointgate` command. Thin on purpose: it parses the command line, sets up logging,
//! loads the configuration, calls into the library and turns the outcome into an exit
//! code: 0 success, 64 usage error, 78 configuration error, 1 anything else.
//! `pointgate charge` exits by the charge's outcome (see `pointgate::charge::exit_code`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use pointgate::config::{Config, ConfigError};
use pointgate::control::{self, ControlReply, ControlRequest, Outcome, RequestDetail, RequestRow};
use pointgate::money::Site;
#[cfg(feature = "devtools")]
use pointgate::sim::SimConfig;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;
const DEFAULT_CONFIG: &str = "/etc/pointgate/pointgate.toml";

/// How long tasks left over after `run` returns may take before the process exits.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);
/// How long `status` and `queue` wait for the agent's answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Parser)]
#[command(
    name = "pointgate",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PG_GIT_REV"), ")"),
    about = "In-store agent: MQTT checkout stations to Mercado Pago Point terminals, durably",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (what the systemd unit runs).
    Run(ConfigArgs),
    /// Validate the configuration offline: exit 0, or 78 with a message naming the key.
    CheckConfig(ConfigArgs),
    /// Run the Point API simulator, for developing offline.
    Sim(SimArgs),
    /// Show the whole flow on this machine: broker, simulator, agent and stations.
    Demo,
    /// A station on the command line: publish one charge and print its events until the
    /// final state. Exit 0 approved; 2 declined, canceled or expired; 3 needs_attention;
    /// 4 failed or refused; 1 anything else.
    Charge(ChargeCli),
    /// The running agent's status, pending requests and terminals (control socket).
    Status(StatusArgs),
    /// Inspect the agent's requests; cancel a stuck one; resolve a needs_attention charge.
    Queue(QueueArgs),
}

#[derive(Debug, Args)]
struct ChargeCli {
    /// The station to charge as (its topics and, with the shipped ACL, its username).
    #[arg(long, value_name = "ID")]
    station: String,
    /// The amount, a decimal string in major units: 15.00
    #[arg(long, value_name = "A")]
    amount: String,
    /// The terminal (may be left out when the station has exactly one).
    #[arg(long, value_name = "T")]
    terminal: Option<String>,
    /// The broker [default: mqtt.url of the configuration]
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// The station's MQTT username.
    #[arg(long, value_name = "U")]
    username: Option<String>,
    /// A file holding the station's MQTT password.
    #[arg(long, value_name = "F")]
    password_file: Option<PathBuf>,
    /// The agent's configuration, for the broker and topic prefix [default: $POINTGATE_CONFIG, else /etc/pointgate/pointgate.toml]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The topic prefix [default: the configuration's, pointgate/<store.id>]
    #[arg(long, value_name = "P")]
    topic_prefix: Option<String>,
    /// The charge's description.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// The request id [default: a fresh one, cli-<ms>-<hex>]
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
    /// How long to wait for the final state after publishing.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print each event as its JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the agent's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct QueueArgs {
    #[command(subcommand)]
    op: QueueOp,
    /// The configuration file, for control.socket [default: $POINTGATE_CONFIG, else /etc/pointgate/pointgate.toml]
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Print the agent's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum QueueOp {
    /// Open requests and those that ended in the last hour.
    List,
    /// One request: its stored fields and latest event. ID is <station>/<request_id>.
    Show { id: String },
    /// Cancel a charge that waits or whose intent is still OPEN, as its station would.
    Cancel {
        id: String,
        /// How long to wait for the charge's final state.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// End a needs_attention charge after checking the terminal (resolved_by: operator).
    Resolve {
        id: String,
        /// What the terminal shows: approved or declined.
        #[arg(long = "as", value_name = "OUTCOME", value_parser = parse_outcome)]
        outcome: Outcome,
    },
}

fn parse_outcome(text: &str) -> Result<Outcome, String> {
    match text {
        "approved" => Ok(Outcome::Approved),
        "declined" => Ok(Outcome::Declined),
        _ => Err(format!("`{text}` is not approved or declined")),
    }
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// The configuration file [default: $POINTGATE_CONFIG, else /etc/pointgate/pointgate.toml]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

impl ConfigArgs {
    /// `--config`, else a non-empty `POINTGATE_CONFIG`, else the packaged path.
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| {
                std::env::var_os("POINTGATE_CONFIG")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }
}

#[derive(Debug, Args)]
struct SimArgs {
    /// Where the simulated API listens (HTTPS).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Where the plain-HTTP control endpoint listens (none when not given).
    #[arg(long, value_name = "ADDR")]
    control: Option<SocketAddr>,
    /// Mercado Pago site: MLA, MLB or MLM.
    #[arg(long, value_name = "SITE", default_value = "MLA", value_parser = parse_site)]
    site: Site,
    /// The bearer token the simulator accepts.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Terminal ids in PDV mode, comma-separated.
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    devices: Vec<String>,
    /// Write the simulator's CA certificate (PEM) here.
    #[arg(long, value_name = "PATH")]
    ca_out: Option<PathBuf>,
}

fn parse_site(text: &str) -> Result<Site, String> {
    match text.to_ascii_uppercase().as_str() {
        "MLA" => Ok(Site::MLA),
        "MLB" => Ok(Site::MLB),
        "MLM" => Ok(Site::MLM),
        _ => Err(format!("`{text}` is not MLA, MLB or MLM")),
    }
}

/// Why a command failed, by exit code.
#[derive(Debug)]
enum Failure {
    /// 78.
    Config(String),
    /// 1.
    Other(anyhow::Error),
    /// This exit code; what happened was already printed.
    Exit(u8),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e.to_string())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

impl From<pointgate::RunError> for Failure {
    fn from(e: pointgate::RunError) -> Self {
        match e {
            pointgate::RunError::Config(message) => Failure::Config(message),
            other => Failure::Other(anyhow::Error::new(other)),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout and are a success; anything else is a usage
            // error (64), not clap's own 2.
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EX_USAGE),
            };
        }
    };
    let outcome = match cli.command {
        Command::Run(args) => run(&args.path()),
        Command::CheckConfig(args) => check_config(&args.path()),
        Command::Sim(args) => sim(args),
        Command::Demo => demo(),
        Command::Charge(args) => charge(args),
        Command::Status(args) => status(args),
        Command::Queue(args) => queue(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(message)) => {
            eprintln!("pointgate: configuration error: {message}");
            ExitCode::from(EX_CONFIG)
        }
        Err(Failure::Other(e)) => {
            eprintln!("pointgate: {e:#}");
            ExitCode::FAILURE
        }
        Err(Failure::Exit(code)) => ExitCode::from(code),
    }
}

fn load_config(path: &Path) -> Result<Config, ConfigError> {
    // Lossy: a variable that is not UTF-8 cannot be a valid setting anyway, and
    // `std::env::vars` would panic on it.
    let env: HashMap<String, String> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    Config::load(Some(path), &env)
}

fn check_config(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    config.check_files()?;
    println!(
        "pointgate: configuration ok: {} (store {}, {} station(s), broker {})",
        path.display(),
        config.store.id,
        config.stations.len(),
        config.mqtt.url
    );
    Ok(())
}

fn run(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    pointgate::logging::init(&config.log.level);
    // The agent is one busy engine task plus I/O: two workers, and a small blocking pool
    // (DNS lookups run there; unbounded, a burst of new connections made hundreds of
    // threads, each with its stack: docs/performance.md).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        cancel_on_signals(shutdown.clone()).context("cannot install the signal handlers")?;
        let reloads =
            reload_on_sighup(path.to_path_buf()).context("cannot install the SIGHUP handler")?;
        pointgate::run_with_reloads(config, shutdown, reloads)
            .await
            .map_err(Failure::from)
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    outcome
}

/// Each SIGHUP reads the configuration file again and hands it (or why it could not be
/// read) to the agent, which re-reads the token file and takes the new stations.
fn reload_on_sighup(path: PathBuf) -> std::io::Result<mpsc::Receiver<pointgate::Reload>> {
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(
                signal = "SIGHUP",
                "reloading the token file and the stations"
            );
            if tx.send(load_config(&path)).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// SIGTERM or SIGINT cancels `shutdown`; a second one exits at once (the store makes
/// that safe, as for a crash).
fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = first, "shutdown requested");
        shutdown.cancel();
        let second = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(signal = second, "second signal: exiting at once");
        std::process::exit(1);
    });
    tracing::debug!("signal handlers installed");
    Ok(())
}

/// The simulator's configuration from the command line; unset flags keep its defaults.
#[cfg(feature = "devtools")]
fn sim_config(args: SimArgs) -> SimConfig {
    let defaults = SimConfig::default();
    SimConfig {
        listen: args.listen,
        control: args.control,
        site: args.site,
        token: args.token.unwrap_or(defaults.token),
        devices: if args.devices.is_empty() {
            defaults.devices
        } else {
            args.devices
        },
        ca_out: args.ca_out,
        ..SimConfig::default()
    }
}

#[cfg(feature = "devtools")]
fn sim(args: SimArgs) -> Result<(), Failure> {
    pointgate::logging::init("info");
    let config = sim_config(args);
    runtime()?
        .block_on(pointgate::sim::run_cli(config))
        .map_err(|e| anyhow::anyhow!(e).into())
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?)
}

#[cfg(feature = "devtools")]
fn demo() -> Result<(), Failure> {
    pointgate::logging::init("error,rumqttd=off");
    runtime()?
        .block_on(pointgate::demo::run())
        .map_err(|e| anyhow::anyhow!(e).into())
}

/// The packaged agent is built without the developer tools (the simulator and the
/// demo's embedded broker: a smaller binary on the box, and no HTTP server code in the
/// daemon). Said plainly instead of failing to parse.
#[cfg(not(feature = "devtools"))]
fn without_devtools(what: &str) -> Result<(), Failure> {
    Err(anyhow::anyhow!(
        "`pointgate {what}` is a developer tool, not in this build (the packaged agent is built \
         without the `devtools` feature); run it from a source checkout: cargo run --release -- {what}"
    )
    .into())
}

#[cfg(not(feature = "devtools"))]
fn sim(_args: SimArgs) -> Result<(), Failure> {
    without_devtools("sim")
}

#[cfg(not(feature = "devtools"))]
fn demo() -> Result<(), Failure> {
    without_devtools("demo")
}

fn charge(args: ChargeCli) -> Result<(), Failure> {
    pointgate::logging::init("warn");
    let need_config = args.broker.is_none() || args.topic_prefix.is_none();
    let config = match &args.config {
        Some(path) => Some(load_config(path)?),
        None if need_config => Some(load_config(&ConfigArgs { config: None }.path())?),
        None => None,
    };
    let password = match &args.password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("--password-file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let (broker, prefix, ca_file) = match &config {
        Some(c) => (
            args.broker.clone().unwrap_or_else(|| c.mqtt.url.clone()),
            args.topic_prefix
                .clone()
                .unwrap_or_else(|| c.topic_prefix()),
            c.mqtt.ca_path().map(Path::to_path_buf),
        ),
        None => (
            args.broker.clone().unwrap_or_default(),
            args.topic_prefix.clone().unwrap_or_default(),
            None,
        ),
    };
    let station = pointgate::charge::ChargeArgs {
        station: args.station,
        amount: args.amount,
        terminal: args.terminal,
        description: args.description,
        request_id: args.request_id,
        broker,
        username: args.username,
        password,
        ca_file,
        topic_prefix: prefix,
        timeout: args.timeout,
    };
    let json = args.json;
    let end = runtime()?
        .block_on(pointgate::charge::run(&station, |ev| {
            if json {
                println!("{ev}");
            } else {
                println!("{}", pointgate::charge::describe(ev));
            }
        }))
        .map_err(|e| Failure::Other(e.into()))?;
    let id = format!("{}/{}", station.station, end.request_id);
    match end.state.as_deref() {
        Some(state) => {
            if !json {
                println!("charge {id}: {state}");
                if state == "needs_attention" {
                    println!("the outcome is not known: check the terminal, then `pointgate queue resolve {id} --as approved|declined`");
                }
            }
        }
        None => {
            let last = end
                .last
                .as_ref()
                .and_then(|e| e["state"].as_str())
                .unwrap_or("not even accepted");
            eprintln!(
                "pointgate: no final state within {}; the charge is {last} (see `pointgate queue show {id}`)",
                humantime::format_duration(station.timeout)
            );
        }
    }
    match pointgate::charge::exit_code(end.state.as_deref()) {
        0 => Ok(()),
        code => Err(Failure::Exit(code)),
    }
}

/// One request to the agent named by the configuration at `path`.
fn ask(path: &Path, request: &ControlRequest) -> Result<ControlReply, Failure> {
    let config = load_config(path)?;
    let socket = config.control.socket;
    let reply = runtime()?
        .block_on(control::call(&socket, request, CONTROL_TIMEOUT))
        .map_err(|e| Failure::Other(e.into()))?;
    match reply {
        ControlReply::Error(f) => Err(Failure::Other(anyhow::anyhow!(f.message))),
        other => Ok(other),
    }
}

fn print_json(reply: &ControlReply) {
    println!(
        "{}",
        serde_json::to_string_pretty(reply).unwrap_or_default()
    );
}

fn status(args: StatusArgs) -> Result<(), Failure> {
    let reply = ask(&args.config.path(), &ControlRequest::Status)?;
    if args.json {
        print_json(&reply);
        return Ok(());
    }
    let ControlReply::Status(s) = reply else {
        return Err(Failure::Other(anyhow::anyhow!(
            "unexpected answer: {reply:?}"
        )));
    };
    let a = &s.agent;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!(
        "agent      {} (api {})  store {}  backend {}  version {}  since {}",
        a.state,
        opt(&a.api),
        opt(&a.store),
        opt(&a.backend),
        opt(&a.version),
        opt(&a.since)
    );
    let by_state: Vec<String> = s
        .pending
        .by_state
        .iter()
        .map(|(state, n)| format!("{state} {n}"))
        .collect();
    println!(
        "pending    {}{}",
        s.pending.total,
        if s.pending.total > 0 {
            format!(
                " (oldest {} s): {}",
                s.pending.oldest_pending_s,
                by_state.join(", ")
            )
        } else {
            String::new()
        }
    );
    println!("stations   {}", s.stations.len());
    let station_of = |t: &str| {
        s.stations
            .iter()
            .find(|(_, ts)| ts.iter().any(|x| x == t))
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![vec![
        "TERMINAL".to_string(),
        "STATION".into(),
        "MODE".into(),
        "BUSY".into(),
        "CURRENT".into(),
        "WAITING".into(),
    ]];
    for t in &s.terminals {
        rows.push(vec![
            t.terminal.clone(),
            station_of(&t.terminal),
            t.mode.clone(),
            if t.busy { "yes" } else { "no" }.into(),
            t.current.clone().unwrap_or_else(|| "-".into()),
            t.waiting.to_string(),
        ]);
    }
    println!();
    print_table(&rows);
    Ok(())
}

fn queue(args: QueueArgs) -> Result<(), Failure> {
    let path = ConfigArgs {
        config: args.config.clone(),
    }
    .path();
    let request = match &args.op {
        QueueOp::List => ControlRequest::List,
        QueueOp::Show { id } => ControlRequest::Show { id: id.clone() },
        QueueOp::Cancel { id, .. } => ControlRequest::Cancel { id: id.clone() },
        QueueOp::Resolve { id, outcome } => ControlRequest::Resolve {
            id: id.clone(),
            outcome: *outcome,
        },
    };
    let mut reply = ask(&path, &request)?;
    // A cancel through Mercado Pago ends when its answer comes: wait for it.
    if let (QueueOp::Cancel { id, wait }, ControlReply::Changed(c)) = (&args.op, &reply) {
        if !c.request.is_final {
            let until = std::time::Instant::now() + *wait;
            while std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(300));
                if let ControlReply::Show(d) = ask(&path, &ControlRequest::Show { id: id.clone() })?
                {
                    if d.row.is_final {
                        let message = format!("`{id}` is {}", d.row.state);
                        reply = ControlReply::Changed(control::ChangeView {
                            request: d.row,
                            message,
                        });
                        break;
                    }
                }
            }
        }
    }
    if args.json {
        print_json(&reply);
        return Ok(());
    }
    match reply {
        ControlReply::List(l) => print_rows(&l.requests),
        ControlReply::Show(d) => print_detail(&d),
        ControlReply::Changed(c) => {
            println!("{}", c.message);
            print_rows(std::slice::from_ref(&c.request));
        }
        other => print_json(&other),
    }
    Ok(())
}

fn print_rows(requests: &[RequestRow]) {
    if requests.is_empty() {
        println!("no open requests, and none ended in the last hour");
        return;
    }
    let mut rows = vec![vec![
        "ID".to_string(),
        "TYPE".into(),
        "STATE".into(),
        "AGE".into(),
        "TERMINAL".into(),
        "AMOUNT".into(),
        "DETAIL".into(),
    ]];
    for r in requests {
        rows.push(vec![
            r.id.clone(),
            serde_json::to_value(r.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            r.state.clone(),
            humantime::format_duration(Duration::from_secs(r.age_s)).to_string(),
            r.terminal.clone().unwrap_or_else(|| "-".into()),
            r.amount.clone().unwrap_or_else(|| "-".into()),
            r.detail
                .clone()
                .or_else(|| r.target.as_ref().map(|t| format!("target {t}")))
                .unwrap_or_default(),
        ]);
    }
    print_table(&rows);
}

fn print_detail(d: &RequestDetail) {
    let r = &d.row;
    let mut lines = vec![
        ("request", r.id.clone()),
        (
            "type",
            serde_json::to_value(r.kind)
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .unwrap_or_default(),
        ),
        (
            "state",
            format!("{}{}", r.state, if r.is_final { " (final)" } else { "" }),
        ),
        ("received", d.received_at.clone()),
    ];
    let mut add = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            lines.push((k, v));
        }
    };
    add("ended", d.final_at.clone());
    add("stage", d.stage.clone());
    add("deadline", d.deadline_at.clone());
    add("terminal", r.terminal.clone());
    add("amount", r.amount.clone());
    add("detail", r.detail.clone());
    add("target", r.target.clone());
    add("reference", d.external_reference.clone());
    add("reply topic", d.reply_topic.clone());
    for (k, v) in lines {
        println!("{k:<12} {v}");
    }
    println!("events");
    for e in &d.events {
        println!("  {}", pointgate::charge::describe(e));
    }
}

/// Columns padded to their widest cell, two spaces apart.
fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[cfg(feature = "devtools")]
    #[test]
    fn sim_flags_reach_the_simulator_config() {
        let cli = Cli::try_parse_from([
            "pointgate",
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:9",
            "--site",
            "mlb",
            "--token",
            "T",
            "--devices",
            "A,B",
            "--ca-out",
            "ca.pem",
        ])
        .expect("valid flags");
        let Command::Sim(args) = cli.command else {
            panic!("not sim")
        };
        let config = sim_config(args);
        assert_eq!(config.listen, "127.0.0.1:0".parse().expect("addr"));
        assert_eq!(config.control, Some("127.0.0.1:9".parse().expect("addr")));
        assert_eq!(config.site, Site::MLB);
        assert_eq!(config.token, "T");
        assert_eq!(config.devices, ["A", "B"]);
        assert_eq!(config.ca_out, Some(PathBuf::from("ca.pem")));
    }

    #[cfg(feature = "devtools")]
    #[test]
    fn sim_without_flags_keeps_the_simulator_defaults() {
        let cli = Cli::try_parse_from(["pointgate", "sim"]).expect("valid flags");
        let Command::Sim(args) = cli.command else {
            panic!("not sim")
        };
        let config = sim_config(args);
        let defaults = SimConfig::default();
        assert_eq!(config.token, defaults.token);
        assert_eq!(config.devices, defaults.devices);
        assert_eq!(config.control, None);
        assert_eq!(config.listen.port(), 8443);
    }

    #[test]
    fn a_bad_site_is_a_usage_error() {
        let e = Cli::try_parse_from(["pointgate", "sim", "--site", "XX"]).expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn queue_takes_its_flags_after_the_operation() {
        let cli = Cli::try_parse_from([
            "pointgate",
            "queue",
            "resolve",
            "kiosk-1/r1",
            "--as",
            "declined",
            "--config",
            "x.toml",
            "--json",
        ])
        .expect("valid flags");
        let Command::Queue(args) = cli.command else {
            panic!("not queue")
        };
        assert_eq!(args.config, Some(PathBuf::from("x.toml")));
        assert!(args.json);
        match args.op {
            QueueOp::Resolve { id, outcome } => {
                assert_eq!(id, "kiosk-1/r1");
                assert_eq!(outcome, Outcome::Declined);
            }
            other => panic!("{other:?}"),
        }
        let e = Cli::try_parse_from(["pointgate", "queue", "resolve", "k/1", "--as", "maybe"])
            .expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        let e =
            Cli::try_parse_from(["pointgate", "queue", "resolve", "k/1"]).expect_err("needs --as");
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn charge_needs_station_and_amount_and_waits_10_minutes_by_default() {
        let cli = Cli::try_parse_from(["pointgate", "charge", "--station", "k", "--amount", "1"])
            .expect("valid flags");
        let Command::Charge(args) = cli.command else {
            panic!("not charge")
        };
        assert_eq!(args.timeout, Duration::from_secs(600));
        assert!(args.broker.is_none() && args.config.is_none());
        let e = Cli::try_parse_from(["pointgate", "charge", "--station", "k"]).expect_err("amount");
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    }
}
