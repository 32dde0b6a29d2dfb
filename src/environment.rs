//! Where a run happened: library versions, CPU model and the instruction-set flags that decide
//! 16-bit support, GPU, OS. Support of an op depends on all of these, so a report without them
//! cannot be compared with another.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// CPU flags that change what 16-bit kernels exist or how fast they are.
pub const RELEVANT_CPU_FLAGS: &[&str] = &[
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
    "asimd",
    "fphp",
    "asimdhp",
    "bf16",
    "sve",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub peft_compat: String,
    /// Library name -> version (tch, libtorch, candle), for those compiled in.
    pub libraries: BTreeMap<String, String>,
    pub cpu_model: String,
    /// The relevant flags this CPU has (from /proc/cpuinfo).
    pub cpu_flags: Vec<String>,
    pub cpu_count: usize,
    /// CUDA version libtorch was built for, if any.
    pub cuda: Option<String>,
    /// GPU names as the driver reports them; empty without one.
    pub gpus: Vec<String>,
    pub os: String,
    pub arch: String,
}

fn cpuinfo_field(info: &str, key: &str) -> Option<String> {
    info.lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn os_name() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string());
    match (pretty, kernel) {
        (Some(p), Some(k)) => format!("{p} (Linux {k})"),
        (Some(p), None) => p,
        (None, Some(k)) => format!("Linux {k}"),
        (None, None) => std::env::consts::OS.to_string(),
    }
}

/// GPU names from `nvidia-smi`, when it exists; nothing otherwise.
fn gpus() -> Vec<String> {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

impl Environment {
    /// This machine, with the libraries its backend workers reported (`libraries`, and the
    /// CUDA version libtorch was built for).
    pub fn detect(libraries: BTreeMap<String, String>, cuda: Option<String>) -> Environment {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<String> = cpuinfo_field(&info, "flags")
            .or_else(|| cpuinfo_field(&info, "Features"))
            .unwrap_or_default()
            .split_whitespace()
            .filter(|f| RELEVANT_CPU_FLAGS.contains(f))
            .map(String::from)
            .collect();
        let cpu_model = cpuinfo_field(&info, "model name")
            .or_else(|| cpuinfo_field(&info, "CPU part"))
            .unwrap_or_else(|| "unknown".into());
        Environment {
            peft_compat: env!("CARGO_PKG_VERSION").to_string(),
            libraries,
            cpu_model,
            cpu_flags: flags,
            cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cuda,
            gpus: gpus(),
            os: os_name(),
            arch: std::env::consts::ARCH.to_string(),
        }
    }
}
