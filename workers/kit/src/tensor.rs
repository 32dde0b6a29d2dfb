//! Tensors on the host: what crosses the process boundary and what the f64 reference computes on.

use crate::case::DType;

/// A dense row-major tensor on the host. Values are f64, which holds every f16, bf16 and f32
/// value exactly, so a tensor read back from a backend loses nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape/data mismatch"
        );
        HostTensor { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        HostTensor::new(shape, vec![0.0; n])
    }

    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    pub fn cols(&self) -> usize {
        if self.shape.len() > 1 {
            self.shape[1]
        } else {
            1
        }
    }

    /// Every element rounded to `dtype`.
    pub fn rounded(&self, dtype: DType) -> HostTensor {
        HostTensor::new(
            self.shape.clone(),
            self.data.iter().map(|&v| dtype.round(v)).collect(),
        )
    }

    /// Little-endian bytes in `dtype`; exact when the values are representable in it.
    pub fn to_le_bytes(&self, dtype: DType) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() * dtype.size());
        for &v in &self.data {
            match dtype {
                DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
                DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
                DType::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
                DType::Bf16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            }
        }
        out
    }

    /// The inverse of [`HostTensor::to_le_bytes`]; `bytes` holds exactly one value per element.
    pub fn from_le_bytes(shape: Vec<usize>, dtype: DType, bytes: &[u8]) -> HostTensor {
        let data: Vec<f64> = match dtype {
            DType::F64 => bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64)
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
            DType::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
        };
        HostTensor::new(shape, data)
    }

    pub fn max_abs(&self) -> f64 {
        self.data.iter().fold(0.0, |m, v| m.max(v.abs()))
    }
}
