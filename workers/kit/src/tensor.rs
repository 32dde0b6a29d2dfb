//! Tensors on the host: what crosses the process boundary and what the f64 reference computes on.

use crate::case::DType;
use crate::parallel;

/// Values per chunk of the parallel passes over a tensor.
const CHUNK: usize = 1 << 16;

/// Little-endian bytes of `values` in `dtype` (see [`HostTensor::to_le_bytes`]).
pub fn encode_values(values: &[f64], dtype: DType) -> Vec<u8> {
    let size = dtype.size();
    let n = values.len() * size;
    let mut out = vec![0u8; n];
    parallel::map_chunks(&mut out, CHUNK * size, n, parallel::threads(), |i, c| {
        for (b, &v) in c.chunks_exact_mut(size).zip(&values[i * CHUNK..]) {
            match dtype {
                DType::F64 => b.copy_from_slice(&v.to_le_bytes()),
                DType::F32 => b.copy_from_slice(&(v as f32).to_le_bytes()),
                DType::F16 => b.copy_from_slice(&half::f16::from_f64(v).to_le_bytes()),
                DType::Bf16 => b.copy_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
                DType::F8e4m3 => b[0] = crate::fp8::E4M3FN.to_bits(crate::fp8::E4M3FN.round(v)),
                DType::F8e5m2 => b[0] = crate::fp8::E5M2.to_bits(crate::fp8::E5M2.round(v)),
            }
        }
    });
    out
}

/// `out.len()` values of `dtype` read from `file` at byte `offset`, with one positioned read.
pub fn read_values(
    file: &std::fs::File,
    offset: u64,
    dtype: DType,
    out: &mut [f64],
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; out.len() * dtype.size()];
    file.read_exact_at(&mut buf, offset)?;
    decode_values(&buf, dtype, out);
    Ok(())
}

/// A tensor of `shape` stored as `dtype` in `file` from byte `offset` on, read in parallel
/// chunks of positioned reads: the reader never holds the file's bytes whole (a mapping would
/// count them in its memory too).
pub fn read_tensor(
    file: &std::fs::File,
    offset: u64,
    dtype: DType,
    shape: Vec<usize>,
) -> std::io::Result<HostTensor> {
    let n: usize = shape.iter().product();
    let mut data = vec![0.0; n];
    let size = dtype.size();
    parallel::map_chunks(&mut data, CHUNK, n * size, parallel::threads(), |k, c| {
        read_values(file, offset + (k * CHUNK * size) as u64, dtype, c)
    })
    .into_iter()
    .collect::<std::io::Result<()>>()?;
    Ok(HostTensor::new(shape, data))
}

/// The values of `bytes` (little-endian `dtype`, at least `out.len()` of them) into `out`.
pub fn decode_values(bytes: &[u8], dtype: DType, out: &mut [f64]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(dtype.size())) {
        *o = match dtype {
            DType::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")),
            DType::F32 => f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
            DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
            DType::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
            DType::F8e4m3 => crate::fp8::E4M3FN.from_bits(b[0]),
            DType::F8e5m2 => crate::fp8::E5M2.from_bits(b[0]),
        };
    }
}

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
        encode_values(&self.data, dtype)
    }

    /// The inverse of [`HostTensor::to_le_bytes`]; `bytes` holds exactly one value per element.
    pub fn from_le_bytes(shape: Vec<usize>, dtype: DType, bytes: &[u8]) -> HostTensor {
        let size = dtype.size();
        let mut data = vec![0.0; bytes.len() / size];
        let threads = parallel::threads();
        parallel::map_chunks(&mut data, CHUNK, bytes.len(), threads, |i, c| {
            decode_values(&bytes[i * CHUNK * size..], dtype, c)
        });
        HostTensor::new(shape, data)
    }

    pub fn max_abs(&self) -> f64 {
        self.data.iter().fold(0.0, |m, v| m.max(v.abs()))
    }
}
