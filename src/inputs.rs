//! Case inputs: drawn once per shape from one seeded generator, then rounded once into the case
//! dtype. Both backends and the f64 reference receive exactly these bits, so any difference between
//! them is the computation's, not the data's.

use crate::case::{Adapter, DType, Op, Shape};
use crate::reference;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

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

/// Everything a case feeds to a Linear layer with a LoRA/DoRA adapter, named as in PEFT.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// `input`: [batch, in_features]
    pub x: HostTensor,
    /// `base_layer.weight`: [out_features, in_features]
    pub weight: HostTensor,
    /// `base_layer.bias`: [out_features]
    pub bias: Option<HostTensor>,
    /// `lora_A.weight`: [rank, in_features]
    pub lora_a: HostTensor,
    /// `lora_B.weight`: [out_features, rank]; zeros for `init`, as PEFT initialises it.
    pub lora_b: HostTensor,
    /// `lora_magnitude_vector`: [out_features]; DoRA only, absent for `init` (init computes it).
    pub magnitude: Option<HostTensor>,
    /// `grad_output`: [batch, out_features], the upstream gradient for `backward`.
    pub grad_output: HostTensor,
    /// alpha / r or alpha / sqrt(r).
    pub scaling: f64,
}

/// The raw f64 draws for one shape, shared by every dtype, adapter and op of that shape.
#[derive(Debug, Clone)]
pub struct Draws {
    x: HostTensor,
    weight: HostTensor,
    bias: HostTensor,
    lora_a: HostTensor,
    lora_b: HostTensor,
    magnitude_factor: Vec<f64>,
    grad_output: HostTensor,
    scaling: f64,
    bias_on: bool,
}

/// FNV-1a, so the per-shape seed depends on the shape name and not on hash-map randomness.
fn mix(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn uniform(rng: &mut ChaCha8Rng, shape: Vec<usize>, bound: f64) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(
        shape,
        (0..n).map(|_| rng.random_range(-bound..bound)).collect(),
    )
}

fn normal(rng: &mut ChaCha8Rng, shape: Vec<usize>) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(
        shape,
        (0..n).map(|_| StandardNormal.sample(&mut *rng)).collect(),
    )
}

impl Draws {
    /// Distributions follow PEFT and torch.nn.Linear: weights and bias U(-1/sqrt(fan_in),
    /// 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)); A the same; B as with
    /// `init_lora_weights=False` (U(-1/sqrt(r), 1/sqrt(r))); x and the upstream gradient N(0, 1);
    /// the magnitude is the row norm of the merged weight times U(0.8, 1.2), as after training.
    pub fn generate(shape: &Shape, seed: u64) -> Draws {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, &shape.name));
        let (b, i, o, r) = (
            shape.batch,
            shape.in_features,
            shape.out_features,
            shape.rank,
        );
        let w_bound = 1.0 / (i as f64).sqrt();
        let x = normal(&mut rng, vec![b, i]);
        let weight = uniform(&mut rng, vec![o, i], w_bound);
        let bias = uniform(&mut rng, vec![o], w_bound);
        let lora_a = uniform(&mut rng, vec![r, i], w_bound);
        let lora_b = uniform(&mut rng, vec![o, r], 1.0 / (r as f64).sqrt());
        let magnitude_factor = (0..o).map(|_| rng.random_range(0.8..1.2)).collect();
        let grad_output = normal(&mut rng, vec![b, o]);
        Draws {
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            magnitude_factor,
            grad_output,
            scaling: shape.scaling(),
            bias_on: shape.bias,
        }
    }

    /// The inputs of one case, every tensor rounded once into `dtype`.
    pub fn inputs(&self, dtype: DType, adapter: Adapter, op: Op) -> Inputs {
        let weight = self.weight.rounded(dtype);
        let lora_a = self.lora_a.rounded(dtype);
        let lora_b = if op == Op::Init {
            HostTensor::zeros(self.lora_b.shape.clone())
        } else {
            self.lora_b.rounded(dtype)
        };
        let magnitude = (adapter == Adapter::Dora && op != Op::Init).then(|| {
            // ||W + s B A|| row-wise from the rounded tensors, perturbed, then rounded.
            let norm = reference::weight_norm(&weight, &lora_a, &lora_b, self.scaling);
            let data = norm
                .data
                .iter()
                .zip(&self.magnitude_factor)
                .map(|(n, f)| dtype.round(n * f))
                .collect();
            HostTensor::new(norm.shape.clone(), data)
        });
        Inputs {
            x: self.x.rounded(dtype),
            weight,
            bias: self.bias_on.then(|| self.bias.rounded(dtype)),
            lora_a,
            lora_b,
            magnitude,
            grad_output: self.grad_output.rounded(dtype),
            scaling: self.scaling,
        }
    }
}

impl Inputs {
    /// `(name, tensor)` under PEFT's state-dict names, for dumps.
    pub fn named(&self) -> Vec<(&'static str, &HostTensor)> {
        let mut v = vec![
            ("input", &self.x),
            ("base_layer.weight", &self.weight),
            ("lora_A.weight", &self.lora_a),
            ("lora_B.weight", &self.lora_b),
            ("grad_output", &self.grad_output),
        ];
        if let Some(b) = &self.bias {
            v.push(("base_layer.bias", b));
        }
        if let Some(m) = &self.magnitude {
            v.push(("lora_magnitude_vector", m));
        }
        v
    }
}

/// Named outputs of one case (names without the `output.` prefix that dumps add), in a fixed
/// order. Both the backends (through `adapter`) and `reference` produce this.
pub type Outputs = Vec<(&'static str, HostTensor)>;

/// Output names, shared by the backends, the reference and the dump format.
pub mod names {
    pub const RESULT: &str = "result";
    pub const GRAD_A: &str = "grad.lora_A.weight";
    pub const GRAD_B: &str = "grad.lora_B.weight";
    pub const GRAD_M: &str = "grad.lora_magnitude_vector";
    pub const GRAD_X: &str = "grad.input";
    pub const MERGED: &str = "merged_weight";
    pub const UNMERGED: &str = "unmerged_weight";
    pub const MAGNITUDE: &str = "lora_magnitude_vector";
    /// Every output name (what a worker's reply may carry).
    pub const ALL: &[&str] = &[
        RESULT, GRAD_A, GRAD_B, GRAD_M, GRAD_X, MERGED, UNMERGED, MAGNITUDE,
    ];
}
