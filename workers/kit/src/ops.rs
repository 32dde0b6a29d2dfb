//! The small set of tensor operations the adapter math needs.
//!
//! Each library implements it in its worker crate (`workers/tch/src/ops.rs`,
//! `workers/candle/src/ops.rs`), as glue: it maps these calls onto the library's natural op, the
//! one a user of that library would write, and never upcasts on its own. Where precision is
//! widened is decided in `adapter/`, visibly, from the case's precision policy.

use crate::case::DType;
use crate::tensor::HostTensor;

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
    /// The L2 norm of each row of a 2-D tensor, [n, k] -> \[n\], the way the library's users
    /// write it (tch: `linalg_norm(dim=1)`; candle: `sqr().sum_keepdim(1).sqrt()`).
    fn row_norm(&self, a: &Self::Tensor) -> OpResult<Self::Tensor>;
    /// Rows `ids` (a tensor of exact integer values, any float dtype) of `w`: `F.embedding`.
    fn embedding(&self, ids: &Self::Tensor, w: &Self::Tensor) -> OpResult<Self::Tensor>;
    /// `nn.Conv2d`'s convolution of x [b, c, h, w] with w [o, c / groups, k, k], stride 1, no
    /// padding, over `groups` channel groups, with the bias inside the kernel where given.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        groups: usize,
    ) -> OpResult<Self::Tensor>;
    /// `F.linear(x, w, b)`: x w^T + b as the library's fused kernel computes it (libtorch: one
    /// addmm). The default is the split form, x w^T then + b: what a library without a fused
    /// kernel runs (candle-nn's `Linear` is exactly that).
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> OpResult<Self::Tensor> {
        let y = self.matmul(x, &self.t(w)?)?;
        match bias {
            Some(b) => self.add(&y, b),
            None => Ok(y),
        }
    }
    /// Tensors joined along `dim`.
    fn cat(&self, parts: &[&Self::Tensor], dim: usize) -> OpResult<Self::Tensor>;
    /// Reduced SVD of a 2-D tensor: (U, S, Vh) with S descending, as `torch.linalg.svd(A,
    /// full_matrices=False)`. A library without one says so (an `unsupported` outcome).
    fn svd(&self, a: &Self::Tensor) -> OpResult<(Self::Tensor, Self::Tensor, Self::Tensor)>;
    /// Reduced QR of a 2-D tensor: (Q, R), as `torch.linalg.qr(A)`.
    fn qr(&self, a: &Self::Tensor) -> OpResult<(Self::Tensor, Self::Tensor)>;
    /// `len` entries from `start` along `dim`.
    fn narrow(
        &self,
        a: &Self::Tensor,
        dim: usize,
        start: usize,
        len: usize,
    ) -> OpResult<Self::Tensor>;
    fn sqrt(&self, a: &Self::Tensor) -> OpResult<Self::Tensor>;
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
