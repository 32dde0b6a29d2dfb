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

/// What a backend build says about itself in the worker protocol's `hello`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub backend: String,
    pub libraries: BTreeMap<String, String>,
    pub cuda: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub peft_compat: String,
    /// Library name -> version (tch, libtorch, candle) of the default builds (`tch`, `candle`).
    pub libraries: BTreeMap<String, String>,
    /// Per backend build (`tch`, `tch@2.1.2`, `candle`): the libraries its worker reported,
    /// and `cuda` where its libtorch was built for CUDA. A case's expectations are judged
    /// against its own build's versions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backends: BTreeMap<String, BTreeMap<String, String>>,
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
    /// Every build's libraries in one line: `candle: candle 0.11.1; tch: libtorch 2.11.0, ...`
    /// (the default builds' alone for reports that predate per-build versions).
    pub fn libraries_line(&self) -> String {
        let pairs = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.backends.is_empty() {
            pairs(&self.libraries)
        } else {
            self.backends
                .iter()
                .map(|(b, libs)| format!("{b}: {}", pairs(libs)))
                .collect::<Vec<_>>()
                .join("; ")
        }
    }

    /// The environment as one backend build sees it: its own libraries (and CUDA build) over
    /// the default ones.
    pub fn for_backend(&self, backend: crate::case::Backend) -> Environment {
        let mut env = self.clone();
        if let crate::case::Backend::TchAt(v) = backend {
            // A build is its libtorch release, whether or not its worker said so.
            env.libraries.insert("libtorch".into(), v.to_string());
        }
        if let Some(libs) = self.backends.get(&backend.to_string()) {
            for (k, v) in libs {
                if k == "cuda" {
                    env.cuda = Some(v.clone());
                } else {
                    env.libraries.insert(k.clone(), v.clone());
                }
            }
        }
        env
    }

    /// This machine, with what the backend workers said in `hello`: the default builds'
    /// libraries in `libraries`, every build's in `backends`.
    pub fn of_workers(info: &BTreeMap<crate::case::Backend, WorkerInfo>) -> Environment {
        use crate::case::Backend;
        let mut libraries = BTreeMap::new();
        let mut cuda = None;
        let mut backends = BTreeMap::new();
        for (b, info) in info {
            let mut libs = info.libraries.clone();
            if matches!(b, Backend::Tch | Backend::Candle) {
                libraries.extend(info.libraries.clone());
                if *b == Backend::Tch {
                    cuda = cuda.or(info.cuda.clone());
                }
            }
            if let Some(c) = &info.cuda {
                libs.insert("cuda".into(), c.clone());
            }
            backends.insert(b.to_string(), libs);
        }
        let mut env = Environment::detect(libraries, cuda);
        env.backends = backends;
        env
    }

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
            backends: BTreeMap::new(),
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
