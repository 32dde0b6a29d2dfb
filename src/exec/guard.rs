//! The resource guard: before a case runs, estimate from its shape how much memory it needs
//! (host and device) and refuse what cannot fit, with the estimate and the limit in the
//! message, instead of letting an allocation abort the process.
//!
//! A refused case is `skipped` (it did not run here; like an absent device, the gate reports it
//! as "not checked here", never as a pass). `--max-memory` sets the host limit (default: the
//! memory available when the run starts); the device limit is the GPU's memory as `nvidia-smi`
//! reports it, or `--max-device-memory`.
//!
//! The estimate counts, per case, in f64 arithmetic so that absurd shapes cannot overflow:
//! - the runner: the f64 draws and the rounded f64 inputs, the reference's f64 intermediates
//!   (about five weight-sized buffers for merge and unmerge: dW, W + dW, the merged and
//!   restored weights, the decoded output), and the payloads in the case dtype;
//! - the worker: the inputs decoded to f64, the library's tensors (about eight weight-sized
//!   intermediates, in fp32 at least, as the upcast path widens them) and the f64 download;
//! - on CUDA, the library's tensors live on the device instead.

use crate::case::{Case, Device};
use crate::util::human_bytes;

/// Limits a case is held to; `None` = not limited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub host: Option<f64>,
    pub device: Option<f64>,
}

/// Bytes a case is estimated to need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub host: f64,
    pub device: f64,
}

/// The estimate for `case` (see the module doc for what it counts).
pub fn estimate(case: &Case) -> Estimate {
    let s = &case.shape;
    let (b, i, o, r) = (
        s.batch as f64,
        s.in_features as f64,
        s.out_features as f64,
        s.rank as f64,
    );
    // A Conv2d's weight holds k*k values per (out, in) pair; its input b*in*image^2, and the
    // reference's im2col b*positions*in*k*k.
    let (kk, img) = match case.point.layer {
        crate::case::Layer::Conv2d => ((s.kernel * s.kernel) as f64, (s.image * s.image) as f64),
        _ => (1.0, 1.0),
    };
    let weight = o * i * kk;
    let patches = b * img * i * kk;
    // x, W, bias, A, B, m, grad_output
    let inputs = b * i * img + weight + o + r * i * kk + o * r + o + b * o * img + patches;
    let dsize = case.point.dtype.size() as f64;
    let wide = dsize.max(4.0);
    let runner = 8.0 * (2.0 * inputs + 5.0 * weight + 2.0 * b * o) + dsize * inputs;
    let library = 8.0 * weight * wide + inputs * dsize;
    let worker = 8.0 * inputs + 8.0 * weight + 2.0 * weight * dsize;
    match case.point.device {
        Device::Cpu => Estimate {
            host: runner + worker + library,
            device: 0.0,
        },
        Device::Cuda(_) => Estimate {
            host: runner + worker,
            device: library,
        },
    }
}

/// Why `case` must not run under `limits`, or `None` when it fits.
pub fn refuse(case: &Case, limits: &Limits) -> Option<String> {
    let e = estimate(case);
    let s = &case.shape;
    let geometry = format!(
        "{} x {} weight, rank {}, batch {}, {}",
        s.out_features, s.in_features, s.rank, s.batch, case.point.dtype
    );
    if let Some(limit) = limits.host.filter(|&l| e.host > l) {
        return Some(format!(
            "not run: needs about {} of host memory ({geometry}), more than the {} limit \
             (--max-memory raises it)",
            human_bytes(e.host),
            human_bytes(limit)
        ));
    }
    if let Some(limit) = limits.device.filter(|&l| e.device > l) {
        return Some(format!(
            "not run: needs about {} of {} memory ({geometry}), more than its {} \
             (--max-device-memory raises it)",
            human_bytes(e.device),
            case.point.device,
            human_bytes(limit)
        ));
    }
    None
}

/// The memory available to new processes now (`MemAvailable` in /proc/meminfo), in bytes.
pub fn available_host_memory() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// The smallest GPU memory `nvidia-smi` reports, in bytes; `None` without a GPU or the tool.
pub fn device_memory() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|mib| mib * 1024.0 * 1024.0)
        .reduce(f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::*;

    fn case(o: usize, i: usize) -> Case {
        Case {
            point: Point {
                backend: Backend::Tch,
                device: Device::Cpu,
                dtype: DType::F32,
                adapter: Adapter::Dora,
                op: Op::Merge,
                precision: Precision::Native,
                layer: Layer::Linear,
                profile: Profile::Normal,
            },
            shape: Shape::new("s", 4, i, o, 16, 16.0),
        }
    }

    #[test]
    fn absurd_shapes_are_refused_with_the_estimate_and_the_limit() {
        let limits = Limits {
            host: Some(16e9),
            device: None,
        };
        let why = refuse(&case(1_000_000, 1_000_000_000), &limits).unwrap();
        assert!(why.contains("PB of host memory"), "{why}");
        assert!(why.contains("16.0 GB limit"), "{why}");
        assert!(why.contains("--max-memory"), "{why}");
        assert_eq!(refuse(&case(512, 256), &limits), None);
        // An LLM layer passes a 24 GB machine's guard.
        let llm = estimate(&case(11008, 4096)).host;
        assert!(llm < 8e9, "{}", human_bytes(llm));
    }
}
