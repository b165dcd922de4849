use clap::Parser;
use rpcd::config::{Config, DEFAULT_PATH};
use std::path::PathBuf;

/// rpcd: prefork RPC daemon with ZooKeeper registration (runs in the foreground).
#[derive(Parser)]
#[command(name = "rpcd", version, about)]
struct Args {
    /// Configuration file.
    #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// Validate the configuration, print the error if any, and exit (0 = valid, 1 = invalid).
    #[arg(short = 't', long)]
    check_config: bool,
    /// Internal: run as a worker process spawned by the master.
    #[arg(long, hide = true)]
    worker: bool,
}

fn main() {
    let args = Args::parse();
    if args.worker {
        rpcd::worker::run();
    }
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rpcd: configuration error: {e}");
            std::process::exit(1);
        }
    };
    if args.check_config {
        println!("rpcd: configuration {} is valid", args.config.display());
        std::process::exit(0);
    }
    rpcd::logging::init(&cfg.log, "");
    std::process::exit(rpcd::master::run(args.config, cfg));
}
