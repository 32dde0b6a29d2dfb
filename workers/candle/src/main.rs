//! `peft-compat-worker-candle`: started by `peft-compat`, speaks the worker protocol on
//! stdin/stdout.

fn main() {
    std::process::exit(peft_compat_kit::serve(&peft_compat_worker_candle::Candle));
}
