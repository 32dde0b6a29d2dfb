//! libtorch through tch: glue from `TensorOps` to ATen ops.

use peft_compat_kit::case::{DType, Device, LibtorchBuild, Version};
use peft_compat_kit::ops::{BackendError, OpResult, TensorOps};
use peft_compat_kit::tensor::HostTensor;
use tch::{Kind, Tensor};

/// The libtorch release this binary was built against (`2.11.0` of `2.11.0+cu130`).
pub fn libtorch_release() -> Option<Version> {
    libtorch_version().split('+').next()?.parse().ok()
}

/// The tch crate version this binary was built with: the one workers/tch/libtorch-builds.txt
/// pairs with its libtorch (each build's manifest pins exactly that one; a test checks the
/// workspace's).
pub fn tch_version() -> String {
    libtorch_release()
        .and_then(LibtorchBuild::of)
        .map_or("unknown".into(), |b| b.tch.to_string())
}

/// The libtorch version found at build time (torch's `version.py` or libtorch's `build-version`).
pub fn libtorch_version() -> String {
    option_env!("PEFT_COMPAT_LIBTORCH_VERSION")
        .unwrap_or("unknown")
        .to_string()
}

/// CUDA version libtorch was built against, when it was.
pub fn libtorch_cuda_version() -> Option<&'static str> {
    option_env!("PEFT_COMPAT_LIBTORCH_CUDA").filter(|s| !s.is_empty() && *s != "None")
}

pub fn unavailable(device: Device) -> Option<String> {
    match device {
        Device::Cpu => None,
        Device::Cuda(n) => {
            if !tch::Cuda::is_available() {
                Some("no CUDA device (libtorch: torch.cuda.is_available() is false)".into())
            } else if (n as i64) >= tch::Cuda::device_count() {
                Some(format!(
                    "no CUDA device {n} (libtorch sees {})",
                    tch::Cuda::device_count()
                ))
            } else {
                None
            }
        }
    }
}

/// Keep libtorch's own words, without the C++ backtrace that follows them.
fn err(e: tch::TchError) -> BackendError {
    let text = match e {
        tch::TchError::Torch(s) => s,
        other => other.to_string(),
    };
    let cut = text
        .find("\nException raised from")
        .map(|i| &text[..i])
        .unwrap_or(&text);
    BackendError::new(cut.trim())
}

fn kind(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::Bf16 => Kind::BFloat16,
        DType::F64 => Kind::Double,
        DType::F8e4m3 => fp8::E4M3,
        DType::F8e5m2 => fp8::E5M2,
    }
}

/// Whether `t` holds fp8. tch's `*_scalar` ops drop their temporary `Scalar` before reading
/// libtorch's error, and that drop panics on the pending error; fp8 tensors, whose scalar ops
/// libtorch refuses, go through a 0-dim tensor instead, so the refusal comes back as an error.
fn is_fp8(t: &Tensor) -> bool {
    let k = t.kind();
    k != Kind::Float && (k == fp8::E4M3 || k == fp8::E5M2)
}

/// torch's fp8 kinds, which tch has from 0.19 (libtorch 2.6) on; build.rs sets `tch_fp8` for
/// those builds. Older builds never receive an fp8 case (the runner skips it, saying why), so
/// their stand-in kind is never used.
#[cfg(tch_fp8)]
mod fp8 {
    pub const E4M3: tch::Kind = tch::Kind::Float8e4m3fn;
    pub const E5M2: tch::Kind = tch::Kind::Float8e5m2;
}
#[cfg(not(tch_fp8))]
mod fp8 {
    pub const E4M3: tch::Kind = tch::Kind::Float;
    pub const E5M2: tch::Kind = tch::Kind::Float;
}

pub struct TchOps {
    device: tch::Device,
}

impl TchOps {
    pub fn new(device: Device) -> Self {
        let device = match device {
            Device::Cpu => tch::Device::Cpu,
            Device::Cuda(n) => tch::Device::Cuda(n),
        };
        TchOps { device }
    }
}

impl TensorOps for TchOps {
    type Tensor = Tensor;

    fn upload(&self, host: &HostTensor, dtype: DType) -> OpResult<Tensor> {
        let d = &host.data;
        let flat = match dtype {
            DType::F64 => Tensor::f_from_slice(d),
            DType::F32 => Tensor::f_from_slice(&d.iter().map(|&v| v as f32).collect::<Vec<_>>()),
            DType::F16 => Tensor::f_from_slice(
                &d.iter()
                    .map(|&v| half::f16::from_f64(v))
                    .collect::<Vec<_>>(),
            ),
            // tch 0.24 declares `half::bf16` as Kind::Half, so bf16 slices would be read as
            // fp16 bits; go through f32 instead (exact: the values are bf16-representable).
            DType::Bf16 => Tensor::f_from_slice(&d.iter().map(|&v| v as f32).collect::<Vec<_>>())
                .and_then(|t| t.f_to_kind(Kind::BFloat16)),
            // fp8 values are exact in f32; the cast keeps them.
            DType::F8e4m3 | DType::F8e5m2 => {
                Tensor::f_from_slice(&d.iter().map(|&v| v as f32).collect::<Vec<_>>())
                    .and_then(|t| t.f_to_kind(kind(dtype)))
            }
        }
        .map_err(err)?;
        let shape: Vec<i64> = host.shape.iter().map(|&s| s as i64).collect();
        flat.f_reshape(shape.as_slice())
            .and_then(|t| t.f_to(self.device))
            .map_err(err)
    }

    fn download(&self, t: &Tensor) -> OpResult<HostTensor> {
        let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
        let flat = t
            .f_detach()
            .and_then(|t| t.f_to(tch::Device::Cpu))
            .and_then(|t| t.f_to_kind(Kind::Double))
            .and_then(|t| t.f_reshape([-1i64].as_slice()))
            .map_err(err)?;
        let data = Vec::<f64>::try_from(&flat).map_err(err)?;
        Ok(HostTensor::new(shape, data))
    }

    fn cast(&self, t: &Tensor, dtype: DType) -> OpResult<Tensor> {
        t.f_to_kind(kind(dtype)).map_err(err)
    }
    fn matmul(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.f_matmul(b).map_err(err)
    }
    fn t(&self, a: &Tensor) -> OpResult<Tensor> {
        a.f_tr().map_err(err)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.f_add(b).map_err(err)
    }
    fn sub(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.f_sub(b).map_err(err)
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.f_mul(b).map_err(err)
    }
    fn div(&self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        a.f_div(b).map_err(err)
    }
    fn scale(&self, a: &Tensor, s: f64) -> OpResult<Tensor> {
        if is_fp8(a) {
            return a.f_mul(&Tensor::from(s)).map_err(err);
        }
        a.f_mul_scalar(s).map_err(err)
    }
    fn add_scalar(&self, a: &Tensor, s: f64) -> OpResult<Tensor> {
        if is_fp8(a) {
            return a.f_add(&Tensor::from(s)).map_err(err);
        }
        a.f_add_scalar(s).map_err(err)
    }
    fn reshape(&self, a: &Tensor, shape: &[usize]) -> OpResult<Tensor> {
        let shape: Vec<i64> = shape.iter().map(|&s| s as i64).collect();
        a.f_reshape(shape.as_slice()).map_err(err)
    }
    fn row_norm(&self, a: &Tensor) -> OpResult<Tensor> {
        // torch.linalg.norm(weight, dim=1), as PEFT's get_weight_norm; it accumulates in fp32
        // internally and returns the input dtype.
        a.f_linalg_norm(2.0, [1i64].as_slice(), false, None::<Kind>)
            .map_err(err)
    }
    fn embedding(&self, ids: &Tensor, w: &Tensor) -> OpResult<Tensor> {
        ids.f_to_kind(Kind::Int64)
            .and_then(|ids| Tensor::f_embedding(w, &ids, -1, false, false))
            .map_err(err)
    }
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        groups: usize,
    ) -> OpResult<Tensor> {
        x.f_conv2d(w, bias, [1i64, 1], [0i64, 0], [1i64, 1], groups as i64)
            .map_err(err)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> OpResult<Tensor> {
        // F.linear: one addmm with the bias (nn.Linear's forward).
        x.f_linear(w, bias).map_err(err)
    }
    fn cat(&self, parts: &[&Tensor], dim: usize) -> OpResult<Tensor> {
        Tensor::f_cat(parts, dim as i64).map_err(err)
    }
    fn svd(&self, a: &Tensor) -> OpResult<(Tensor, Tensor, Tensor)> {
        // torch.svd(some=True) runs the same kernel as torch.linalg.svd(full_matrices=False)
        // ("linalg_svd_cpu" / "svd_cuda_gesvdj"); tch's linalg_svd always passes a `driver`,
        // which libtorch refuses on CPU. It returns V, not Vh.
        let (u, s, v) = a.f_svd(true, true).map_err(err)?;
        Ok((u, s, v.f_tr().map_err(err)?))
    }
    fn qr(&self, a: &Tensor) -> OpResult<(Tensor, Tensor)> {
        Tensor::f_linalg_qr(a, "reduced").map_err(err)
    }
    fn narrow(&self, a: &Tensor, dim: usize, start: usize, len: usize) -> OpResult<Tensor> {
        a.f_narrow(dim as i64, start as i64, len as i64)
            .map_err(err)
    }
    fn sqrt(&self, a: &Tensor) -> OpResult<Tensor> {
        a.f_sqrt().map_err(err)
    }
    fn detach(&self, a: &Tensor) -> OpResult<Tensor> {
        a.f_detach().map_err(err)
    }
    fn param(&self, a: &Tensor) -> OpResult<Tensor> {
        a.f_detach()
            .and_then(|t| t.f_set_requires_grad(true))
            .map_err(err)
    }
    fn grads(&self, y: &Tensor, upstream: &Tensor, wrt: &[&Tensor]) -> OpResult<Vec<Tensor>> {
        let loss = y.f_mul(upstream).and_then(|t| t.f_sum(None)).map_err(err)?;
        Tensor::f_run_backward(&[&loss], wrt, false, false).map_err(err)
    }
}
