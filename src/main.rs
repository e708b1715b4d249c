//! The `pointgate` command. Thin on purpose: it parses the command line, sets up logging,
//! loads the configuration, calls into the library and turns the outcome into an exit
//! code: 0 success, 64 usage error, 78 configuration error, 1 anything else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use pointgate::config::{Config, ConfigError};
use pointgate::money::Site;
use pointgate::sim::SimConfig;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;
const DEFAULT_CONFIG: &str = "/etc/pointgate/pointgate.toml";

/// How long tasks left over after `run` returns may take before the process exits.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        cancel_on_signals(shutdown.clone()).context("cannot install the signal handlers")?;
        pointgate::run(config, shutdown)
            .await
            .map_err(Failure::from)
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    outcome
}

/// SIGTERM or SIGINT cancels `shutdown`; a second one exits at once (the store makes
/// that safe, as for a crash). SIGHUP (re-read the token and stations) comes later.
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

fn demo() -> Result<(), Failure> {
    pointgate::logging::init("error,rumqttd=off");
    runtime()?
        .block_on(pointgate::demo::run())
        .map_err(|e| anyhow::anyhow!(e).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

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
}
