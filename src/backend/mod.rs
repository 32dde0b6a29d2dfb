//! The small set of tensor operations the adapter math needs, and one implementation per library.
//!
//! Each backend file is glue: it maps these calls onto the library's natural op, the one a user of
//! that library would write, and never upcasts on its own. Where precision is widened is decided
//! in `adapter/`, visibly, from the case's precision policy.

use crate::case::{Backend, DType, Device};
use crate::inputs::HostTensor;

#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "tch")]
pub mod tch;

/// What a backend said when it refused an operation, verbatim (first paragraph of the library's
/// own message, without C++ backtraces).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub message: String,
}

impl BackendError {
    pub fn new(message: impl Into<String>) -> Self {
        BackendError {
            message: message.into(),
        }
    }
}

pub type OpResult<T> = Result<T, BackendError>;

/// Tensor operations over one library and device. All binary ops broadcast like NumPy.
pub trait TensorOps {
    type Tensor;

    /// A tensor holding exactly `host`'s values in `dtype` (they are representable: inputs are
    /// rounded beforehand).
    fn upload(&self, host: &HostTensor, dtype: DType) -> OpResult<Self::Tensor>;
    /// Values read back exactly (every supported dtype widens losslessly to f64).
    fn download(&self, t: &Self::Tensor) -> OpResult<HostTensor>;
    fn cast(&self, t: &Self::Tensor, dtype: DType) -> OpResult<Self::Tensor>;
    /// 2-D matrix product.
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor) -> OpResult<Self::Tensor>;
    /// 2-D transpose.
    fn t(&self, a: &Self::Tensor) -> OpResult<Self::Tensor>;
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> OpResult<Self::Tensor>;
    fn sub(&self, a: &Self::Tensor, b: &Self::Tensor) -> OpResult<Self::Tensor>;
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> OpResult<Self::Tensor>;
    fn div(&self, a: &Self::Tensor, b: &Self::Tensor) -> OpResult<Self::Tensor>;
    /// `a * s` for a Python-style scalar.
    fn scale(&self, a: &Self::Tensor, s: f64) -> OpResult<Self::Tensor>;
    /// `a + s` for a Python-style scalar.
    fn add_scalar(&self, a: &Self::Tensor, s: f64) -> OpResult<Self::Tensor>;
    fn reshape(&self, a: &Self::Tensor, shape: &[usize]) -> OpResult<Self::Tensor>;
    /// The L2 norm of each row of a 2-D tensor, [n, k] -> [n], the way the library's users
    /// write it (tch: `linalg_norm(dim=1)`; candle: `sqr().sum_keepdim(1).sqrt()`).
    fn row_norm(&self, a: &Self::Tensor) -> OpResult<Self::Tensor>;
    /// A copy cut off from the autograd graph.
    fn detach(&self, a: &Self::Tensor) -> OpResult<Self::Tensor>;
    /// A leaf that gradients are taken with respect to.
    fn param(&self, a: &Self::Tensor) -> OpResult<Self::Tensor>;
    /// Gradients of `sum(y * upstream)` with respect to each of `wrt` (made by `param`).
    fn grads(
        &self,
        y: &Self::Tensor,
        upstream: &Self::Tensor,
        wrt: &[&Self::Tensor],
    ) -> OpResult<Vec<Self::Tensor>>;
}

/// Why a (backend, device) pair cannot run here, or `None` when it can.
pub fn unavailable(backend: Backend, device: Device) -> Option<String> {
    match backend {
        Backend::Tch => tch_unavailable(device),
        Backend::Candle => candle_unavailable(device),
    }
}

#[cfg(feature = "tch")]
fn tch_unavailable(device: Device) -> Option<String> {
    tch::unavailable(device)
}

#[cfg(not(feature = "tch"))]
fn tch_unavailable(_: Device) -> Option<String> {
    Some("tch backend not compiled in (build with --features tch)".into())
}

#[cfg(feature = "candle")]
fn candle_unavailable(device: Device) -> Option<String> {
    candle::unavailable(device)
}

#[cfg(not(feature = "candle"))]
fn candle_unavailable(_: Device) -> Option<String> {
    Some("candle backend not compiled in (build with --features candle)".into())
}

/// Library versions compiled in, for the report's environment block.
pub fn versions() -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    #[cfg(feature = "tch")]
    {
        v.push(("tch", tch::TCH_VERSION.to_string()));
        v.push(("libtorch", tch::libtorch_version()));
    }
    #[cfg(feature = "candle")]
    v.push(("candle", candle::CANDLE_VERSION.to_string()));
    v
}

/// The CUDA version libtorch was built against, when tch is compiled in and it was.
pub fn cuda_build_version() -> Option<String> {
    #[cfg(feature = "tch")]
    {
        tch::libtorch_cuda_version().map(String::from)
    }
    #[cfg(not(feature = "tch"))]
    {
        None
    }
}
