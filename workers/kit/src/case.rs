//! The vocabulary: the eight axes of a case, the case itself and its id.
//!
//! Every axis value has one spelling (`as_str`) used in matrix files, case ids, JSON reports, dump
//! metadata and tables, so a string seen anywhere can be pasted back into a matrix file.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Serialize a type as its spelling (`Display`) and read it back with `FromStr`, so JSON, YAML
/// and the protocol carry the same string a matrix file does.
macro_rules! serde_as_spelled {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

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

/// A release number `X.Y.Z` (PEFT's or torch's), ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl Version {
    pub const fn new(major: u16, minor: u16, patch: u16) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl std::str::FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('.').collect();
        let num = |p: &str| {
            (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u16>().ok())
                .flatten()
        };
        match parts.as_slice() {
            [a, b, c] => match (num(a), num(b), num(c)) {
                (Some(a), Some(b), Some(c)) => Ok(Version::new(a, b, c)),
                _ => Err(format!("`{s}` is not a release number X.Y.Z")),
            },
            _ => Err(format!("`{s}` is not a release number X.Y.Z")),
        }
    }
}

/// One PEFT release on one torch release, run by the Python worker (`workers/peft/worker.py`)
/// in a virtual environment of its own (`scripts/peft-env.sh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeftBuild {
    pub peft: Version,
    pub torch: Version,
}

impl PeftBuild {
    /// `peft`: the PEFT pinned in scripts/locks/venv.txt, on the project's torch (the libtorch
    /// the `tch` worker links).
    pub const PINNED: PeftBuild = PeftBuild {
        peft: Version::new(0, 21, 2),
        torch: Version::new(2, 11, 0),
    };
    /// The releases on each side of PEFT #1653 (DoRA's init product in fp32), on the torch of
    /// the original report.
    pub const BEFORE_1653: PeftBuild = PeftBuild {
        peft: Version::new(0, 10, 0),
        torch: Version::new(2, 1, 2),
    };
    pub const AFTER_1653: PeftBuild = PeftBuild {
        peft: Version::new(0, 11, 0),
        torch: Version::new(2, 1, 2),
    };
}

/// A libtorch release a tch worker is built for, with the tch crate that targets its minor
/// (`workers/tch/libtorch-builds.txt`, which scripts/libtorch.sh reads too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibtorchBuild {
    pub torch: Version,
    pub tch: Version,
    /// The torch wheel's C++ ABI: pre-C++11 up to 2.6.
    pub cxx11_abi: bool,
}

impl LibtorchBuild {
    /// Every build, in version order.
    pub fn all() -> &'static [LibtorchBuild] {
        static ALL: std::sync::OnceLock<Vec<LibtorchBuild>> = std::sync::OnceLock::new();
        ALL.get_or_init(|| {
            include_str!("../../tch/libtorch-builds.txt")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let v = |s: &str| s.parse::<Version>().expect("libtorch-builds.txt");
                    LibtorchBuild {
                        torch: v(f[0]),
                        tch: v(f[1]),
                        cxx11_abi: f[2] == "cxx11",
                    }
                })
                .collect()
        })
    }

    /// The build for exactly `torch`.
    pub fn of(torch: Version) -> Option<LibtorchBuild> {
        Self::all().iter().copied().find(|b| b.torch == torch)
    }

    /// Why no tch worker can exist for `torch`'s minor (no tch release targets it), naming the
    /// neighbours; `None` when one does.
    pub fn missing_minor(torch: Version) -> Option<String> {
        let same_minor =
            |b: &&LibtorchBuild| (b.torch.major, b.torch.minor) == (torch.major, torch.minor);
        if Self::all().iter().any(|b| same_minor(&b)) {
            return None;
        }
        let below = Self::all().iter().rev().find(|b| b.torch < torch);
        let above = Self::all().iter().find(|b| b.torch > torch);
        let near = [below, above]
            .into_iter()
            .flatten()
            .map(|b| format!("tch {} targets {}.{}", b.tch, b.torch.major, b.torch.minor))
            .collect::<Vec<_>>()
            .join(", ");
        Some(format!(
            "no tch release targets libtorch {}.{} ({near}): no worker can be built for it",
            torch.major, torch.minor
        ))
    }
}

/// Which library build runs the case: `tch` is libtorch 2.11 through tch 0.24 (the workspace's
/// worker); `tch@X.Y.Z` is libtorch X.Y.Z through the tch release for its minor (`tch@2.1.2`, the
/// last libtorch without a CPU fp16 matmul, and every build in [`LibtorchBuild::all`]; a minor no
/// tch release targets, such as 2.8, parses and its cases skip saying so); `candle`; `peft` is
/// PEFT's own code (the pinned release on torch 2.11.0) and `peft@X+torchY` PEFT X on torch Y,
/// each through the Python worker. Every build is a worker process of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    Tch,
    /// Never 2.11.0: that spelling is [`Backend::Tch`].
    TchAt(Version),
    Candle,
    Peft(PeftBuild),
}

impl Backend {
    /// libtorch 2.1.2 (tch 0.14): the original report's failure, in the default matrix.
    pub const TCH_2_1_2: Backend = Backend::TchAt(Version::new(2, 1, 2));

    /// The builds this tree provisions and tables list by default, in table order; every other
    /// `tch@X.Y.Z` and `peft@X+torchY` parses too and is provisioned when a matrix names it.
    pub const ALL: &'static [Backend] = &[
        Backend::Tch,
        Backend::TCH_2_1_2,
        Backend::Candle,
        Backend::Peft(PeftBuild::PINNED),
        Backend::Peft(PeftBuild::BEFORE_1653),
        Backend::Peft(PeftBuild::AFTER_1653),
    ];

    /// Valid spellings, for error messages.
    pub fn valid() -> String {
        let builds: Vec<String> = LibtorchBuild::all()
            .iter()
            .map(|b| format!("tch@{}", b.torch))
            .collect();
        format!(
            "tch, {}, candle, peft, peft@PEFT+torchTORCH (e.g. peft@0.10.0+torch2.1.2)",
            builds.join(", ")
        )
    }

    /// The library, whatever its build: `tch` for every libtorch build, `peft` for every PEFT
    /// build.
    pub fn family(self) -> Backend {
        match self {
            Backend::Tch | Backend::TchAt(_) => Backend::Tch,
            Backend::Candle => Backend::Candle,
            Backend::Peft(_) => Backend::Peft(PeftBuild::PINNED),
        }
    }

    /// Whether a matrix pattern's `backend` value covers this build: `tch` covers every
    /// libtorch build and `peft` every PEFT build; `tch@2.1.2` or `peft@0.10.0+torch2.1.2`
    /// only that one.
    pub fn matches(self, pattern: Backend) -> bool {
        self == pattern
            || (matches!(pattern, Backend::Tch | Backend::Peft(PeftBuild::PINNED))
                && self.family() == pattern)
    }

    /// The libtorch release a build computes with (`None` for candle): a PEFT build and the tch
    /// build on the same libtorch run the same kernels, so their outputs are compared
    /// (`agreement`).
    pub fn libtorch(self) -> Option<Version> {
        match self {
            Backend::Tch => Some(PeftBuild::PINNED.torch),
            Backend::TchAt(v) => Some(v),
            Backend::Candle => None,
            Backend::Peft(b) => Some(b.torch),
        }
    }

    /// The PEFT build, for a PEFT backend.
    pub fn peft(self) -> Option<PeftBuild> {
        match self {
            Backend::Peft(b) => Some(b),
            _ => None,
        }
    }

    /// The tch build a PEFT build is held to: the one on its libtorch, when there is one.
    pub fn tch_twin(self) -> Option<Backend> {
        let torch = self.peft()?.torch;
        Some(Backend::tch_at(torch)).filter(|_| LibtorchBuild::of(torch).is_some())
    }

    /// The tch build on libtorch `torch` (`tch` for 2.11.0).
    pub fn tch_at(torch: Version) -> Backend {
        if torch == PeftBuild::PINNED.torch {
            Backend::Tch
        } else {
            Backend::TchAt(torch)
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Tch => f.write_str("tch"),
            Backend::TchAt(v) => write!(f, "tch@{v}"),
            Backend::Candle => f.write_str("candle"),
            Backend::Peft(b) if *b == PeftBuild::PINNED => f.write_str("peft"),
            Backend::Peft(b) => write!(f, "peft@{}+torch{}", b.peft, b.torch),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let unknown = |why: String| {
            format!(
                "unknown backend `{s}`{why}; valid values: {}",
                Backend::valid()
            )
        };
        match s {
            "tch" => Ok(Backend::Tch),
            "candle" => Ok(Backend::Candle),
            "peft" => Ok(Backend::Peft(PeftBuild::PINNED)),
            _ => {
                if let Some(v) = s.strip_prefix("tch@") {
                    let v = v
                        .parse::<Version>()
                        .map_err(|e| unknown(format!(": {e}")))?;
                    let minor_built = LibtorchBuild::all()
                        .iter()
                        .find(|b| (b.torch.major, b.torch.minor) == (v.major, v.minor));
                    return match minor_built {
                        Some(b) if b.torch != v => Err(unknown(format!(
                            " (the libtorch {}.{} build is tch@{})",
                            v.major, v.minor, b.torch
                        ))),
                        _ => Ok(Backend::tch_at(v)),
                    };
                }
                let rest = s
                    .strip_prefix("peft@")
                    .ok_or_else(|| unknown(String::new()))?;
                let (peft, torch) = rest
                    .split_once("+torch")
                    .ok_or_else(|| unknown(" (a PEFT build is peft@PEFT+torchTORCH)".into()))?;
                let v = |x: &str| x.parse::<Version>().map_err(|e| unknown(format!(": {e}")));
                Ok(Backend::Peft(PeftBuild {
                    peft: v(peft)?,
                    torch: v(torch)?,
                }))
            }
        }
    }
}

serde_as_spelled!(Backend);

axis_enum!(
    /// Element type every tensor of the case is stored in. `f8e4m3` and `f8e5m2` (torch's
    /// `float8_e4m3fn` and `float8_e5m2`) are storage formats of the base weight: torch has no
    /// fp8 add, division or norm, so anything but `native` computes in bf16 (see
    /// [`DType::compute`]); every tensor of an fp8 case is drawn into fp8 values.
    DType { F32 => "f32", F16 => "f16", Bf16 => "bf16", F64 => "f64", F8e4m3 => "f8e4m3", F8e5m2 => "f8e5m2" }
);
axis_enum!(
    /// Which PEFT adapter (and init) is applied to the layer: `lora` and `dora` start from
    /// random A (and B = 0 at init); `pissa` (SVD of W), `pissa_dora` (PiSSA with DoRA's
    /// magnitude on top) and `olora` (QR of W) compute A, B and the residual weight from W.
    Adapter { Lora => "lora", Dora => "dora", Pissa => "pissa", PissaDora => "pissa_dora", Olora => "olora" }
);
axis_enum!(
    /// The operation under test; each has its own outputs (see `adapter::run`).
    /// `init_noop`: the adapted layer at init against the base layer alone; `parity`: the
    /// merged layer's forward against the unmerged one; `roundtrip`: merge then unmerge,
    /// judged against the original weight; `step`: one SGD step (learning rate [`Shape::lr`])
    /// after forward and backward, judged on the updated adapter tensors.
    Op {
        Init => "init", Forward => "forward", Backward => "backward", Merge => "merge", Unmerge => "unmerge",
        InitNoop => "init_noop", Parity => "parity", Roundtrip => "roundtrip", Step => "step"
    }
);
axis_enum!(
    /// `native`: all in the case dtype (pre-#1653 PEFT). `upcast`: PEFT's fixed fp32 products.
    /// `autocast`: PEFT's default since 0.12 (`autocast_adapter_dtype=True`): the adapter is
    /// initialised in the base dtype (through the fixed path), then stored in fp32, and its
    /// branch runs in fp32 on an fp32 copy of the input; the result is cast back.
    /// `fp32_init`: the original article's last advice: build and initialise the adapted layer
    /// in fp32 on the case's device, then cast the base layer and adapter to the case dtype and
    /// run the op there, through PEFT's code as it is today (its fp32 products included: what a
    /// PEFT build runs after `model.to(dtype)`); for ops without an init it is the upcast path
    /// after an fp32 construction.
    Precision { Native => "native", Upcast => "upcast", Autocast => "autocast", Fp32Init => "fp32_init" }
);
axis_enum!(
    /// The layer the adapter wraps. `embedding`: in_features = num_embeddings, out_features =
    /// embedding_dim, batch = number of token ids. `conv2d`: in/out_features = channels, a
    /// `kernel` x `kernel` kernel (stride 1, no padding) over `image` x `image` inputs.
    Layer { Linear => "linear", Embedding => "embedding", Conv2d => "conv2d" }
);
axis_enum!(
    /// How the base weight is drawn. `normal`: nn.Linear's init; `llm`: N(0, 0.02), the scale
    /// of trained LLM projections; `zero_rows`: every fourth output row of W exactly zero
    /// (PEFT #2049); `large`: entries ~300, whose fp16 sum of squares overflows while the norm
    /// fits; `tiny`: entries ~1e-4, whose fp16 squares underflow. Inputs are scaled so that
    /// outputs stay in range: what overflows is the computation, not the data.
    Profile { Normal => "normal", Llm => "llm", ZeroRows => "zero_rows", Large => "large", Tiny => "tiny" }
);

impl Adapter {
    /// DoRA's magnitude is part of the adapter.
    pub fn is_dora(self) -> bool {
        matches!(self, Adapter::Dora | Adapter::PissaDora)
    }

    /// The init computes A and B from the base weight (SVD or QR) and rewrites the weight.
    pub fn is_data_init(self) -> bool {
        matches!(self, Adapter::Pissa | Adapter::PissaDora | Adapter::Olora)
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
            DType::F8e4m3 => 2f64.powi(-4),
            DType::F8e5m2 => 2f64.powi(-3),
        }
    }

    pub fn is_16bit(self) -> bool {
        matches!(self, DType::F16 | DType::Bf16)
    }

    pub fn is_fp8(self) -> bool {
        matches!(self, DType::F8e4m3 | DType::F8e5m2)
    }

    /// A reduced-precision dtype: one whose tensors PEFT's fixed and autocast paths treat
    /// differently from native.
    pub fn is_low(self) -> bool {
        self.is_16bit() || self.is_fp8()
    }

    /// The dtype this storage dtype computes in off the native path: bf16 for fp8 (the
    /// compute dtype of fp8-stored checkpoints; fp8 values are exact in it), itself otherwise.
    pub fn compute(self) -> DType {
        if self.is_fp8() {
            DType::Bf16
        } else {
            self
        }
    }
    /// Round an f64 to the nearest value of this dtype (ties to even), returned as f64 (exact).
    pub fn round(self, v: f64) -> f64 {
        match self {
            DType::F64 => v,
            DType::F32 => v as f32 as f64,
            DType::F16 => half::f16::from_f64(v).to_f64(),
            DType::Bf16 => half::bf16::from_f64(v).to_f64(),
            DType::F8e4m3 => crate::fp8::E4M3FN.round(v),
            DType::F8e5m2 => crate::fp8::E5M2.round(v),
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F8e4m3 | DType::F8e5m2 => 1,
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

serde_as_spelled!(Device);

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
    /// Conv2d only: the kernel's side (stride 1, no padding).
    #[serde(default = "three")]
    pub kernel: usize,
    /// Conv2d only: the input image's side.
    #[serde(default = "eight")]
    pub image: usize,
    /// PEFT's `lora_bias=True`: lora_B carries a trainable bias (PEFT >= 0.14), added to the
    /// adapter's output before the scaling; merging adds `scaling * lora_B.bias` to the base
    /// layer's bias.
    #[serde(default, skip_serializing_if = "is_false")]
    pub lora_bias: bool,
    /// Conv2d only: the base convolution's `groups` (in, out and rank divisible by it). PEFT
    /// (>= 0.16) keeps lora_A a full convolution and gives lora_B the base layer's groups.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub groups: usize,
    /// How the base layer is computed: `split` (x W^T, then + b) or `fused` (one addmm:
    /// `F.linear`, what `nn.Linear` runs; a convolution with its bias).
    #[serde(default, skip_serializing_if = "Base::is_split")]
    pub base: Base,
    /// Draw this shape's tensors as the named shape of the same geometry does (its very values),
    /// so that an option (`base`, `lr`) is compared on identical inputs; by default every shape
    /// draws from a stream of its own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draws: Option<String>,
    /// The learning rate of the `step` op's SGD step.
    #[serde(default = "step_lr", skip_serializing_if = "is_step_lr")]
    pub lr: f64,
}

axis_enum!(
    /// How a base layer computes its output (the [`Shape::base`] option).
    Base { Split => "split", Fused => "fused" }
);

#[allow(clippy::derivable_impls)] // the enum comes from `axis_enum!`, which derives no Default
impl Default for Base {
    fn default() -> Base {
        Base::Split
    }
}

impl Base {
    fn is_split(&self) -> bool {
        *self == Base::Split
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// The `step` op's default learning rate: LoRA fine-tuning's usual 1e-4, at which a bf16
/// parameter of size ~0.5 swallows updates below 2e-3 whole (the trap the op is there to show).
pub const STEP_LR: f64 = 1e-4;

fn step_lr() -> f64 {
    STEP_LR
}

fn is_step_lr(v: &f64) -> bool {
    *v == STEP_LR
}

fn yes() -> bool {
    true
}

fn three() -> usize {
    3
}

fn eight() -> usize {
    8
}

impl Shape {
    /// A named geometry with every optional key at the default a matrix file gives it (bias on,
    /// no rsLoRA, a 3x3 kernel on 8x8 images, no lora_bias, one group, a split base, the step's
    /// default lr, its own draws); set the others with struct update syntax.
    pub fn new(
        name: impl Into<String>,
        batch: usize,
        in_features: usize,
        out_features: usize,
        rank: usize,
        alpha: f64,
    ) -> Shape {
        Shape {
            name: name.into(),
            batch,
            in_features,
            out_features,
            rank,
            alpha,
            bias: yes(),
            rslora: false,
            kernel: three(),
            image: eight(),
            lora_bias: false,
            groups: one(),
            base: Base::Split,
            draws: None,
            lr: STEP_LR,
        }
    }

    /// PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// Where a case sits on the eight axes: the one place the axis values are spelled out. Case,
/// the worker protocol's case, the report's case and the dump metadata all carry a `Point`
/// (flattened, so their JSON keeps one key per axis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Point {
    pub backend: Backend,
    pub device: Device,
    pub dtype: DType,
    pub adapter: Adapter,
    pub op: Op,
    pub precision: Precision,
    /// Absent in reports written before the layer axis: `linear`.
    #[serde(default = "linear")]
    pub layer: Layer,
    /// Absent in reports written before the profile axis: `normal`.
    #[serde(default = "normal")]
    pub profile: Profile,
}

fn linear() -> Layer {
    Layer::Linear
}

fn normal() -> Profile {
    Profile::Normal
}

impl Point {
    /// The axis names, in the order rules, ids and metadata write them.
    pub const AXES: [&'static str; 8] = [
        "backend",
        "device",
        "dtype",
        "adapter",
        "op",
        "precision",
        "layer",
        "profile",
    ];

    /// Each axis's value as matrix files spell it, in [`Point::AXES`] order.
    pub fn values(&self) -> [String; 8] {
        [
            self.backend.to_string(),
            self.device.to_string(),
            self.dtype.to_string(),
            self.adapter.to_string(),
            self.op.to_string(),
            self.precision.to_string(),
            self.layer.to_string(),
            self.profile.to_string(),
        ]
    }
}

/// One fully specified combination, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub point: Point,
    pub shape: Shape,
}

/// Where a case sits on the nine axes (the shape by name): what matrix patterns match against,
/// whether they hold a [`Case`] about to run or a case already reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coords<'a> {
    pub point: Point,
    pub shape: &'a str,
}

/// The stable id of a case from its coordinates:
/// `backend/device/dtype/adapter/op/precision/shape`, then `/layer` unless it is `linear` and
/// `/profile` unless it is `normal` (so the ids of linear, normal cases read as they always did;
/// layer and profile names never coincide, so the suffixes cannot be confused).
pub fn case_id(c: &Coords) -> String {
    let p = &c.point;
    let mut id = format!(
        "{}/{}/{}/{}/{}/{}/{}",
        p.backend, p.device, p.dtype, p.adapter, p.op, p.precision, c.shape
    );
    if p.layer != Layer::Linear {
        id.push('/');
        id.push_str(p.layer.as_str());
    }
    if p.profile != Profile::Normal {
        id.push('/');
        id.push_str(p.profile.as_str());
    }
    id
}

impl Case {
    pub fn coords(&self) -> Coords<'_> {
        Coords {
            point: self.point,
            shape: &self.shape.name,
        }
    }

    /// Stable identifier (see [`case_id`]); snapshots key on it.
    pub fn id(&self) -> String {
        case_id(&self.coords())
    }

    /// Why this combination is not a case at all (the matrix expansion drops it), or `None`.
    /// PiSSA and OLoRA are Linear-only in PEFT, and once initialised they are LoRA (or DoRA)
    /// adapters: their own question is the init, and whether the layer still computes W.
    pub fn not_a_case(&self) -> Option<&'static str> {
        if self.point.backend.peft().is_some() && self.point.precision == Precision::Upcast {
            return Some("upcast is peft-compat's model of PEFT's fix, not a PEFT switch: a PEFT build's native path runs the release's own fixes");
        }
        if self.shape.groups > 1 && self.point.layer != Layer::Conv2d {
            return Some("groups is a Conv2d option");
        }
        if self.shape.lora_bias && self.point.layer == Layer::Embedding {
            return Some("PEFT's lora.Embedding has no lora_bias (`lora_bias=True is not supported for Embedding`)");
        }
        if self.shape.base == Base::Fused && self.point.layer == Layer::Embedding {
            return Some("an Embedding has no product and bias to fuse: base: fused is a Linear and Conv2d option");
        }
        if self.point.adapter.is_data_init() {
            if self.point.layer != Layer::Linear {
                return Some("PEFT initialises PiSSA and OLoRA on Linear layers only");
            }
            if !matches!(self.point.op, Op::Init | Op::InitNoop) {
                return Some("after init a PiSSA/OLoRA adapter is a LoRA/DoRA adapter: its other ops are the lora/dora rows");
            }
        }
        None
    }

    /// Why PEFT itself refuses this case by design (reported as a skip that says so, never as a
    /// backend failure), or `None`.
    pub fn refused_by_peft(&self) -> Option<&'static str> {
        if self.shape.lora_bias && self.point.adapter != Adapter::Lora {
            return Some(if self.point.adapter.is_dora() {
                "not applicable: PEFT refuses lora_bias with DoRA by design (`ValueError: The argument lora_bias=True is not supported for DoRA, please pass use_dora=False`)"
            } else {
                "not applicable: PEFT refuses lora_bias with PiSSA/OLoRA inits by design (`lora_bias=True` is only supported with init_lora_weights True or False)"
            });
        }
        let merges = matches!(
            self.point.op,
            Op::Merge | Op::Unmerge | Op::Parity | Op::Roundtrip
        );
        // A PEFT build runs these and shows what its release does (an AttributeError before
        // 0.18, PEFT #2716; the refusal after it); the other backends skip them.
        let peft = self.point.backend.peft().is_some();
        if self.shape.lora_bias && !self.shape.bias && merges && !peft {
            return Some("not applicable: PEFT refuses to merge lora_bias into a base layer without a bias (`Impossible to merge LoRA with lora_bias=True because the base layer has no bias`, PEFT #2716, 0.18.0)");
        }
        if self.shape.groups > 1 && merges && !peft {
            return Some("not applicable: PEFT does not merge into a grouped Conv2d (`NotImplementedError: Merging is not supported for _ConvNd layers with groups > 1!`): the adapter's full convolution does not fit a grouped weight");
        }
        if self.point.adapter.is_data_init() && self.point.dtype == DType::F64 {
            return Some(match self.point.adapter {
                Adapter::Olora => "not applicable: PEFT refuses float64 for OLoRA init by design (olora_init: `TypeError: Unsupported data type for the base layer`)",
                _ => "not applicable: PEFT refuses float64 for PiSSA init by design (pissa_init: `TypeError: Please initialize PiSSA under float32, float16, or bfloat16`)",
            });
        }
        None
    }

    /// Why the case's build cannot express it at all (a skip that says so, never a failure of
    /// the library), or `None`: fp8 dtypes where the build has no fp8 type, lora_bias on a PEFT
    /// release before it.
    pub fn beyond_build(&self) -> Option<String> {
        let b = self.point.backend;
        if self.point.dtype.is_fp8() {
            match b {
                Backend::Candle => return Some("not applicable: peft-compat's candle worker has no fp8 path (candle-core 0.11 has an F8E4M3 dtype but no F8E5M2); fp8 bases run on the tch builds".into()),
                Backend::Peft(_) => return Some("not applicable: the PEFT worker builds no fp8 layer; fp8 bases run on the tch builds".into()),
                Backend::TchAt(v) if v < Version::new(2, 6, 0) => {
                    let tch = LibtorchBuild::of(v).map_or("this tch".into(), |l| format!("tch {}", l.tch));
                    return Some(format!("not applicable: {tch} (libtorch {v}) has no fp8 kinds (tch has Float8e4m3fn and Float8e5m2 from 0.19, libtorch 2.6)"));
                }
                _ => {}
            }
        }
        if let Some(p) = b.peft() {
            if self.shape.lora_bias && p.peft < Version::new(0, 14, 0) {
                return Some(format!(
                    "not applicable: PEFT {} has no lora_bias (added in 0.14.0)",
                    p.peft
                ));
            }
        }
        None
    }

    /// `fp32_init` on an op that initialises the adapter: the layer is built and initialised in
    /// fp32, then cast to the case dtype (for other ops the init is not part of the op, and the
    /// path runs as `native` on the case's inputs).
    pub fn inits_in_fp32(&self) -> bool {
        self.point.precision == Precision::Fp32Init
            && matches!(self.point.op, Op::Init | Op::InitNoop)
    }

    /// A PEFT build's case: where its tch twin sits (the tch build on the same libtorch, every
    /// other axis and the shape the same), whose outputs it is held to.
    pub fn twin_point(&self) -> Option<Point> {
        let backend = self.point.backend.tch_twin()?;
        Some(Point {
            backend,
            ..self.point
        })
    }

    /// The dtype the adapter's tensors (A, B, magnitude) are kept in: fp32 under `autocast`
    /// with a 16-bit or fp8 base (PEFT's `_cast_adapter_dtype`), else the compute dtype (the
    /// case dtype; bf16 for an fp8 base off the native path, the dtype an fp8 checkpoint's
    /// adapter is trained in: fp8 has no arithmetic to keep an adapter in).
    pub fn adapter_dtype(&self) -> DType {
        if self.point.precision == Precision::Autocast && self.point.dtype.is_low() {
            DType::F32
        } else {
            self.compute_dtype()
        }
    }

    /// The dtype the base layer computes in and holds its input, bias and output in: the case
    /// dtype, except an fp8 weight off the native path, which is upcast to bf16 for every
    /// arithmetic op (torch 2.11 has fp8 matmul on CPU, but no fp8 add, division or norm) and
    /// merged back into fp8.
    pub fn compute_dtype(&self) -> DType {
        if self.point.precision == Precision::Native {
            self.point.dtype
        } else {
            self.point.dtype.compute()
        }
    }

    /// Where PEFT's fixed path casts to fp32, for this case; `None` when the upcast path is
    /// identical to the native one (PEFT casts nothing here).
    ///
    /// DoRA init: `lora_B @ lora_A` in fp32 when the adapter is fp16 (PEFT #1653; bf16 and the
    /// device are not looked at). Merge/unmerge: the delta weight in fp32 when the adapter is on
    /// CPU in fp16 or bf16 (`get_delta_weight`, #1017 and #1978).
    pub fn upcast_site(&self) -> Option<&'static str> {
        let init = matches!(self.point.op, Op::Init | Op::InitNoop);
        let merges = matches!(
            self.point.op,
            Op::Merge | Op::Unmerge | Op::Parity | Op::Roundtrip
        );
        match (self.point.adapter, self.point.dtype) {
            (_, d) if d.is_fp8() => Some(
                "an fp8 weight is upcast to bf16 for every op and merged back into fp8; the bf16 adapter's products run in fp32 as PEFT's are (#1017, #1978, #1653)",
            ),
            (a, DType::F16 | DType::Bf16) if a.is_data_init() && init => Some(
                "PiSSA/OLoRA init casts the weight to fp32 for the SVD/QR and the residual, then casts back (PEFT always does)",
            ),
            (Adapter::Dora, DType::F16) if init => {
                Some("DoRA init computes lora_B @ lora_A in fp32 and casts it back (PEFT #1653)")
            }
            (_, DType::F16 | DType::Bf16) if merges && self.point.device.is_cpu() => Some(
                "get_delta_weight computes scaling * (lora_B @ lora_A) in fp32 on CPU and casts it back (PEFT #1017, #1978)",
            ),
            _ => None,
        }
    }

    /// Whether the fp32 products are actually taken in this case. PEFT's autocast default
    /// initialises through the fixed path too (the fix is in the code it runs), and keeps the
    /// delta weight's fp32 product on CPU; so does `fp32_init` after its cast.
    pub fn upcasts(&self) -> bool {
        self.point.precision != Precision::Native && self.upcast_site().is_some()
    }
}
