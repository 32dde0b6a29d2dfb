//! candle-core: glue from `TensorOps` to candle ops, written as a candle user writes them.

use candle_core::{Tensor, Var};
use peft_compat_kit::case::{DType, Device};
use peft_compat_kit::ops::{BackendError, OpResult, TensorOps};
use peft_compat_kit::tensor::HostTensor;

/// The candle-core version this binary was built with (pinned in Cargo.toml; a test checks it).
pub const CANDLE_VERSION: &str = "0.11.1";

pub fn unavailable(device: Device) -> Option<String> {
    match device {
        Device::Cpu => None,
        Device::Cuda(n) => {
            if !cfg!(feature = "cuda") {
                Some(
                    "candle built without CUDA support (PEFT_COMPAT_CANDLE_CUDA=1 scripts/peft-compat builds it)"
                        .into(),
                )
            } else {
                candle_core::Device::new_cuda(n)
                    .err()
                    .map(|e| format!("no CUDA device {n} for candle: {}", first_line(&e)))
            }
        }
    }
}

fn first_line(e: &candle_core::Error) -> String {
    // candle appends a backtrace when RUST_BACKTRACE is set ("stack backtrace:", or frames
    // numbered "   0: ..."); keep the message.
    let text = e.to_string();
    text.lines()
        .take_while(|l| {
            let t = l.trim_start();
            let frame = t
                .split_once(':')
                .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            !(t.starts_with("stack backtrace") || (frame && l.starts_with(' ')))
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

fn err(e: candle_core::Error) -> BackendError {
    BackendError::new(first_line(&e))
}

fn dtype(d: DType) -> candle_core::DType {
    match d {
        DType::F32 => candle_core::DType::F32,
        DType::F16 => candle_core::DType::F16,
        DType::Bf16 => candle_core::DType::BF16,
        DType::F64 => candle_core::DType::F64,
        // The runner never sends candle an fp8 case (Case::unsupported_by_build).
        DType::F8e4m3 | DType::F8e5m2 => candle_core::DType::BF16,
    }
}

pub struct CandleOps {
    device: candle_core::Device,
}

impl CandleOps {
    /// Fails only for CUDA devices that cannot be opened (callers check `unavailable` first).
    pub fn new(device: Device) -> OpResult<Self> {
        let device = match device {
            Device::Cpu => candle_core::Device::Cpu,
            Device::Cuda(n) => candle_core::Device::new_cuda(n).map_err(err)?,
        };
        Ok(CandleOps { device })
    }
}

impl TensorOps for CandleOps {
    type Tensor = Tensor;

    fn upload(&self, host: &HostTensor, dt: DType) -> OpResult<Tensor> {
        let d = &host.data;
        let shape = host.shape.clone();
        match dt {
            DType::F64 => Tensor::from_vec(d.clone(), shape, &self.device),
            DType::F32 => Tensor::from_vec(
                d.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                shape,
                &self.device,
            ),
            DType::F16 => Tensor::from_vec(
                d.iter()
                    .map(|&v| half::f16::from_f64(v))
                    .collect::<Vec<_>>(),
                shape,
                &self.device,
            ),
            DType::Bf16 | DType::F8e4m3 | DType::F8e5m2 => Tensor::from_vec(
                d.iter()
                    .map(|&v| half::bf16::from_f64(v))
                    .collect::<Vec<_>>(),
                shape,
                &self.device,
            ),
        }
        .map_err(err)
    }

    fn download(&self, t: &Tensor) -> OpResult<HostTensor> {
        let shape = t.dims().to_vec();
        let data = t
            .to_dtype(candle_core::DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(err)?;
        Ok(HostTensor::new(shape, data))
    }

    fn cast(&self, t: &Tensor, d: DType) -> OpResult<Tensor> {
        t.to_dtype(dtype(d)).map_err(err)
    }
    fn matmul(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.matmul(b).map_err(err)
    }
    fn t(&self, a: &Tensor) -> OpResult<Tensor> {
        a.t().map_err(err)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.broadcast_add(b).map_err(err)
    }
    fn sub(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.broadcast_sub(b).map_err(err)
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.broadcast_mul(b).map_err(err)
    }
    fn div(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.broadcast_div(b).map_err(err)
    }
    fn scale(&self, a: &Tensor, s: f64) -> OpResult<Tensor> {
        a.affine(s, 0.0).map_err(err)
    }
    fn add_scalar(&self, a: &Tensor, s: f64) -> OpResult<Tensor> {
        a.affine(1.0, s).map_err(err)
    }
    fn reshape(&self, a: &Tensor, shape: &[usize]) -> OpResult<Tensor> {
        a.reshape(shape).map_err(err)
    }
    fn row_norm(&self, a: &Tensor) -> OpResult<Tensor> {
        // The obvious candle spelling; it accumulates in the tensor's own dtype.
        a.sqr()
            .and_then(|t| t.sum(1))
            .and_then(|t| t.sqrt())
            .map_err(err)
    }
    fn embedding(&self, ids: &Tensor, w: &Tensor) -> OpResult<Tensor> {
        // candle_nn::Embedding's forward: an index_select of the weight's rows (which must be
        // contiguous: the adapter branch passes A^T).
        ids.to_dtype(candle_core::DType::U32)
            .and_then(|ids| w.contiguous()?.index_select(&ids, 0))
            .map_err(err)
    }
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        groups: usize,
    ) -> OpResult<Tensor> {
        // candle_nn::Conv2d's forward: the convolution, then the bias broadcast over it.
        let y = x.conv2d(w, 0, 1, 1, groups).map_err(err)?;
        match bias {
            Some(b) => b
                .reshape((1, b.elem_count(), 1, 1))
                .and_then(|b| y.broadcast_add(&b))
                .map_err(err),
            None => Ok(y),
        }
    }
    fn cat(&self, parts: &[&Tensor], dim: usize) -> OpResult<Tensor> {
        Tensor::cat(parts, dim).map_err(err)
    }
    fn svd(&self, _a: &Tensor) -> OpResult<(Tensor, Tensor, Tensor)> {
        Err(BackendError::new(format!(
            "candle-core {CANDLE_VERSION} has no SVD (no linalg module): PiSSA's init cannot run on candle"
        )))
    }
    fn qr(&self, _a: &Tensor) -> OpResult<(Tensor, Tensor)> {
        Err(BackendError::new(format!(
            "candle-core {CANDLE_VERSION} has no QR decomposition (no linalg module): OLoRA's init cannot run on candle"
        )))
    }
    fn narrow(&self, a: &Tensor, dim: usize, start: usize, len: usize) -> OpResult<Tensor> {
        a.narrow(dim, start, len).map_err(err)
    }
    fn sqrt(&self, a: &Tensor) -> OpResult<Tensor> {
        a.sqrt().map_err(err)
    }
    fn detach(&self, a: &Tensor) -> OpResult<Tensor> {
        Ok(a.detach())
    }
    fn param(&self, a: &Tensor) -> OpResult<Tensor> {
        Ok(Var::from_tensor(a).map_err(err)?.as_tensor().clone())
    }
    fn grads(&self, y: &Tensor, upstream: &Tensor, wrt: &[&Tensor]) -> OpResult<Vec<Tensor>> {
        let store = y
            .mul(upstream)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .map_err(err)?;
        wrt.iter()
            .map(|t| {
                store
                    .get(t)
                    .cloned()
                    .ok_or_else(|| BackendError::new("candle: no gradient reached a parameter"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn backtraces_are_cut_from_candle_messages() {
        let e = candle_core::Error::Msg(
            "no CUDA device\n   0: candle_core::error::Error::bt\n   1: main".into(),
        );
        assert_eq!(super::first_line(&e), "no CUDA device");
        let e = candle_core::Error::Msg("a\nstack backtrace:\n   0: x".into());
        assert_eq!(super::first_line(&e), "a");
        let e = candle_core::Error::Msg("shape mismatch: lhs 2:3".into());
        assert_eq!(super::first_line(&e), "shape mismatch: lhs 2:3");
    }
}
