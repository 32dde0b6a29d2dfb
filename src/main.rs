use clap::Parser;
use peft_compat::cli;

fn main() {
    let args = cli::Cli::parse();
    if let Err(f) = cli::run(args) {
        eprintln!("error: {:#}", f.error);
        std::process::exit(f.code);
    }
}
