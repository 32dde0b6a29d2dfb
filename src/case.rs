//! The six axes of a case and the case itself.
//!
//! Every axis value has one spelling (`as_str`) used in matrix files, case ids, JSON reports, dump
//! metadata and tables, so a string seen anywhere can be pasted back into a matrix file.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! axis_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $s)] $variant),+
        }

        impl $name {
            /// Every value, in the order tables and expansions use.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }

            /// Valid spellings, for error messages.
            pub fn valid() -> String {
                [$($s),+].join(", ")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err(format!("unknown {} `{}`; valid values: {}", stringify!($name).to_lowercase(), s, Self::valid())),
                }
            }
        }
    };
}

axis_enum!(
    /// Which tensor library build runs the case: `tch` is libtorch 2.11 through tch 0.24;
    /// `tch@2.1.2` is libtorch 2.1.2 through tch 0.14 (the last libtorch without a CPU fp16
    /// matmul); each build is a worker binary of its own.
    Backend { Tch => "tch", Tch212 => "tch@2.1.2", Candle => "candle" }
);
axis_enum!(
    /// Element type every tensor of the case is stored in.
    DType { F32 => "f32", F16 => "f16", Bf16 => "bf16", F64 => "f64" }
);
axis_enum!(
    /// Which PEFT adapter type is applied to the Linear layer.
    Adapter { Lora => "lora", Dora => "dora" }
);
axis_enum!(
    /// The operation under test; each has its own outputs (see `adapter::Outputs`).
    Op { Init => "init", Forward => "forward", Backward => "backward", Merge => "merge", Unmerge => "unmerge" }
);
axis_enum!(
    /// `native`: all in the case dtype (pre-#1653 PEFT). `upcast`: PEFT's fixed fp32 products.
    Precision { Native => "native", Upcast => "upcast" }
);

impl Backend {
    /// The library, whatever its build: `tch` for every libtorch build.
    pub fn family(self) -> Backend {
        match self {
            Backend::Tch | Backend::Tch212 => Backend::Tch,
            Backend::Candle => Backend::Candle,
        }
    }

    /// Whether a matrix pattern's `backend` value covers this build: `tch` covers every
    /// libtorch build, `tch@2.1.2` only that one.
    pub fn matches(self, pattern: Backend) -> bool {
        self == pattern || (pattern == Backend::Tch && self.family() == Backend::Tch)
    }
}

impl DType {
    /// Unit roundoff: half the distance from 1 to the next representable number.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::F16 => 2f64.powi(-11),
            DType::Bf16 => 2f64.powi(-8),
            DType::F32 => 2f64.powi(-24),
            DType::F64 => 2f64.powi(-53),
        }
    }

    pub fn is_16bit(self) -> bool {
        matches!(self, DType::F16 | DType::Bf16)
    }

    /// Round an f64 to the nearest value of this dtype (ties to even), returned as f64 (exact).
    pub fn round(self, v: f64) -> f64 {
        match self {
            DType::F64 => v,
            DType::F32 => v as f32 as f64,
            DType::F16 => half::f16::from_f64(v).to_f64(),
            DType::Bf16 => half::bf16::from_f64(v).to_f64(),
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::Bf16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    pub fn valid() -> &'static str {
        "cpu, cuda, cuda:N"
    }
    pub fn is_cpu(self) -> bool {
        self == Device::Cpu
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(0) => f.write_str("cuda"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`; valid values: {}", Device::valid())),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One named layer geometry from the matrix file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    #[serde(skip_deserializing, default)]
    pub name: String,
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub rank: usize,
    pub alpha: f64,
    #[serde(default = "yes")]
    pub bias: bool,
    #[serde(default)]
    pub rslora: bool,
}

fn yes() -> bool {
    true
}

impl Shape {
    /// PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// One fully specified combination, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub backend: Backend,
    pub device: Device,
    pub dtype: DType,
    pub adapter: Adapter,
    pub op: Op,
    pub precision: Precision,
    pub shape: Shape,
}

/// Where a case sits on the seven axes (the shape by name): what matrix patterns match against,
/// whether they hold a [`Case`] about to run or a case already reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coords<'a> {
    pub backend: Backend,
    pub device: Device,
    pub dtype: DType,
    pub adapter: Adapter,
    pub op: Op,
    pub precision: Precision,
    pub shape: &'a str,
}

impl Case {
    pub fn coords(&self) -> Coords<'_> {
        Coords {
            backend: self.backend,
            device: self.device,
            dtype: self.dtype,
            adapter: self.adapter,
            op: self.op,
            precision: self.precision,
            shape: &self.shape.name,
        }
    }

    /// Stable identifier, `backend/device/dtype/adapter/op/precision/shape`; snapshots key on it.
    pub fn id(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}/{}/{}",
            self.backend,
            self.device,
            self.dtype,
            self.adapter,
            self.op,
            self.precision,
            self.shape.name
        )
    }

    /// Where PEFT's fixed path casts to fp32, for this case; `None` when the upcast path is
    /// identical to the native one (PEFT casts nothing here).
    ///
    /// DoRA init: `lora_B @ lora_A` in fp32 when the adapter is fp16 (PEFT #1653; bf16 and the
    /// device are not looked at). Merge/unmerge: the delta weight in fp32 when the adapter is on
    /// CPU in fp16 or bf16 (`get_delta_weight`, #1017 and #1978).
    pub fn upcast_site(&self) -> Option<&'static str> {
        match (self.adapter, self.op, self.dtype) {
            (Adapter::Dora, Op::Init, DType::F16) => {
                Some("DoRA init computes lora_B @ lora_A in fp32 and casts it back (PEFT #1653)")
            }
            (_, Op::Merge | Op::Unmerge, DType::F16 | DType::Bf16) if self.device.is_cpu() => Some(
                "get_delta_weight computes scaling * (lora_B @ lora_A) in fp32 on CPU and casts it back (PEFT #1017, #1978)",
            ),
            _ => None,
        }
    }

    /// Whether the fp32 products are actually taken in this case.
    pub fn upcasts(&self) -> bool {
        self.precision == Precision::Upcast && self.upcast_site().is_some()
    }
}
