//! Case inputs: drawn once per shape from one seeded generator, then rounded once into the case
//! dtype. Both backends and the f64 reference receive exactly these bits, so any difference between
//! them is the computation's, not the data's.

use super::{parallel, reference};
use crate::case::{Adapter, DType, Layer, Op, Profile, Shape};
use crate::checkpoint::CheckpointLayer;
use crate::util::fnv1a_from;
use crate::worker::io::Inputs;
use crate::worker::tensor::HostTensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::Arc;

/// A draw's weight rounded into one dtype, shared by every case of that dtype (on an LLM-sized
/// layer, rounding it and DoRA's magnitude from it cost more than many backends' whole op).
pub struct Rounded {
    pub dtype: DType,
    pub weight: Arc<HostTensor>,
    /// DoRA's magnitude on this weight, with trained A and B \[0\] or PiSSA/OLoRA's zero ones \[1\].
    magnitude: [std::sync::OnceLock<HostTensor>; 2],
}

/// Values per chunk of the parallel passes over a weight.
const CHUNK: usize = 1 << 16;

/// The raw f64 draws for one shape, layer and profile, shared by every dtype, adapter and op.
#[derive(Debug, Clone)]
pub struct Draws {
    layer: Layer,
    x: HostTensor,
    weight: Weight,
    bias: HostTensor,
    lora_a: HostTensor,
    lora_b: HostTensor,
    magnitude_factor: Vec<f64>,
    grad_output: HostTensor,
    scaling: f64,
    bias_on: bool,
    /// DoRA's magnitude from a saved adapter (else it is derived from the norm).
    magnitude: Option<HostTensor>,
    /// lora_B's bias (`lora_bias: true`), U(-1/sqrt(r), 1/sqrt(r)) as nn.Linear's bias.
    lora_bias: Option<HostTensor>,
    lr: f64,
}

/// Which tensor a normal draw is for: its chunks' streams are `tag << 32 | chunk`.
#[derive(Debug, Clone, Copy)]
enum Tag {
    X = 1,
    Weight = 2,
    GradOutput = 3,
    LlmWeight = 4,
}

/// A distribution a tensor is drawn from, with where its values come from in the generator.
#[derive(Debug, Clone, Copy)]
enum Dist {
    /// U(-bound, bound) from word `start` of the stream: a uniform f64 takes exactly one u64
    /// (two ChaCha words; rand 0.9's single-sample float range has no rejection), so chunk k
    /// starts 2 k CHUNK words on, and the parallel chunks are the very values of one
    /// sequential stream.
    Uniform { start: u128, bound: f64 },
    /// N(0, 1) (a ziggurat). The first CHUNK values come from the shape's own stream (so every
    /// tensor of up to CHUNK values is drawn as it always was); each further chunk k from its
    /// own ChaCha stream (`tag << 32 | k`) of the same key. A ziggurat sample takes a variable
    /// number of words, so a chunk's place in one stream cannot be found without drawing all
    /// that comes before it; streams of their own make the chunks independent.
    Normal { tag: Tag },
}

/// How to draw one tensor. Its values depend on the seed, the shape's name and the chunk
/// alone, never on the thread count, so any chunk can be drawn on any thread, and drawn again:
/// an LLM-sized weight is kept as its recipe and drawn into each dtype's rounding, never held
/// whole in f64 (a 4096x11008 weight is 360 MB that way).
#[derive(Debug, Clone)]
struct Recipe {
    shape: Vec<usize>,
    /// The generator where the draw starts.
    rng: ChaCha8Rng,
    dist: Dist,
    /// Every value is multiplied by this (1 for none).
    scale: f64,
}

impl Recipe {
    /// A uniform draw at `rng`'s position; `rng` moves past it.
    fn uniform(rng: &mut ChaCha8Rng, shape: Vec<usize>, bound: f64) -> Recipe {
        let n: usize = shape.iter().product();
        let start = rng.get_word_pos();
        rng.set_word_pos(start + 2 * n as u128);
        Recipe {
            shape,
            rng: rng.clone(),
            dist: Dist::Uniform { start, bound },
            scale: 1.0,
        }
    }

    /// A normal draw at `rng`'s position; `rng` moves past the values it draws itself.
    fn normal(rng: &mut ChaCha8Rng, shape: Vec<usize>, tag: Tag) -> Recipe {
        let recipe = Recipe {
            rng: rng.clone(),
            dist: Dist::Normal { tag },
            scale: 1.0,
            shape,
        };
        let head = recipe.len().min(CHUNK);
        for _ in 0..head {
            let _: f64 = StandardNormal.sample(&mut *rng);
        }
        recipe
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Chunk `k`'s values into `out` (CHUNK long, or the rest).
    fn fill(&self, k: usize, out: &mut [f64]) {
        let mut r = self.rng.clone();
        match self.dist {
            Dist::Uniform { start, bound } => {
                r.set_word_pos(start + 2 * (k * CHUNK) as u128);
                out.iter_mut()
                    .for_each(|v| *v = r.random_range(-bound..bound));
            }
            Dist::Normal { tag } => {
                if k > 0 {
                    r.set_stream(((tag as u64) << 32) | k as u64);
                    r.set_word_pos(0);
                }
                out.iter_mut()
                    .for_each(|v| *v = StandardNormal.sample(&mut r));
            }
        }
        if self.scale != 1.0 {
            out.iter_mut().for_each(|v| *v *= self.scale);
        }
    }

    /// Every value, drawn in parallel chunks.
    fn values(&self) -> HostTensor {
        let n = self.len();
        let mut data = vec![0.0; n];
        parallel::map_chunks(&mut data, CHUNK, n, parallel::threads(), |k, c| {
            self.fill(k, c)
        });
        HostTensor::new(self.shape.clone(), data)
    }
}

fn uniform(rng: &mut ChaCha8Rng, shape: Vec<usize>, bound: f64) -> HostTensor {
    Recipe::uniform(rng, shape, bound).values()
}

fn normal(rng: &mut ChaCha8Rng, shape: Vec<usize>, tag: Tag) -> HostTensor {
    Recipe::normal(rng, shape, tag).values()
}

/// A layer's weight: a checkpoint's stored values, or a drawn weight's recipe (see [`Recipe`]).
#[derive(Debug, Clone)]
enum Weight {
    Stored(HostTensor),
    Drawn {
        recipe: Box<Recipe>,
        /// Every fourth row in DoRA's sense is zero (the `zero_rows` profile).
        zero_rows: bool,
    },
}

/// The tensor shapes of one layer (x, W, A, B, the upstream gradient) and its fan-in.
struct Geometry {
    x: Vec<usize>,
    w: Vec<usize>,
    a: Vec<usize>,
    b: Vec<usize>,
    g: Vec<usize>,
    fan_in: usize,
}

impl Geometry {
    fn of(shape: &Shape, layer: Layer) -> Geometry {
        let (b, i, o, r) = (
            shape.batch,
            shape.in_features,
            shape.out_features,
            shape.rank,
        );
        let (k, img) = (shape.kernel, shape.image);
        match layer {
            Layer::Linear => Geometry {
                x: vec![b, i],
                w: vec![o, i],
                a: vec![r, i],
                b: vec![o, r],
                g: vec![b, o],
                fan_in: i,
            },
            Layer::Embedding => Geometry {
                x: vec![b],
                w: vec![i, o],
                a: vec![r, i],
                b: vec![o, r],
                g: vec![b, o],
                fan_in: i,
            },
            Layer::Conv2d => {
                // A grouped convolution's weight holds in / groups input channels per output
                // channel; PEFT's lora_B takes the base layer's groups, lora_A does not.
                let (out, g) = (img - k + 1, shape.groups);
                Geometry {
                    x: vec![b, i, img, img],
                    w: vec![o, i / g, k, k],
                    a: vec![r, i, k, k],
                    b: vec![o, r / g, 1, 1],
                    g: vec![b, o, out, out],
                    fan_in: i / g * k * k,
                }
            }
        }
    }

    /// The activations: token ids below `vocab` for an Embedding, else N(0, 1).
    fn draw_x(&self, rng: &mut ChaCha8Rng, layer: Layer, vocab: usize) -> HostTensor {
        match layer {
            Layer::Embedding => HostTensor::new(
                self.x.clone(),
                (0..self.x[0])
                    .map(|_| rng.random_range(0..vocab) as f64)
                    .collect(),
            ),
            _ => normal(rng, self.x.clone(), Tag::X),
        }
    }
}

/// The typical scale of a `profile`'s weight entries, or `None` for the layer's natural init.
fn profile_scale(profile: Profile) -> Option<f64> {
    match profile {
        Profile::Normal | Profile::ZeroRows | Profile::Llm => None,
        Profile::Large => Some(300.0),
        Profile::Tiny => Some(1e-4),
    }
}

impl Draws {
    /// Distributions follow PEFT and torch.nn: Linear and Conv2d weights and bias
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)), an Embedding's
    /// weight N(0, 1); A like the weight; B as with `init_lora_weights=False`
    /// (U(-1/sqrt(r), 1/sqrt(r))); x and the upstream gradient N(0, 1), token ids uniform; the
    /// magnitude is the DoRA norm of the merged weight times U(0.8, 1.2), as after training.
    ///
    /// Profiles then reshape the weight (see [`Profile`]): `llm` redraws it N(0, 0.02);
    /// `large` and `tiny` redraw it U(-S, S) with S = 300 or 1e-4, scale A by the same factor
    /// (so that dW keeps its share of W) and divide x by it (so that outputs keep their range);
    /// `zero_rows` zeroes every fourth row in the sense of DoRA's norm (an output row or
    /// channel, an embedding dimension). The linear, normal draws are the same as ever, so
    /// older snapshots still hold.
    pub fn generate(shape: &Shape, layer: Layer, profile: Profile, seed: u64) -> Draws {
        let stream = shape.draws.as_deref().unwrap_or(&shape.name);
        let name = match (layer, profile) {
            (Layer::Linear, Profile::Normal) => stream.to_string(),
            _ => format!("{stream}/{layer}/{profile}"),
        };
        // FNV-1a from the seed, so the per-shape stream depends on the shape name, not on hash-map
        // randomness.
        let mut rng = ChaCha8Rng::seed_from_u64(fnv1a_from(seed, name.as_bytes()));
        let geo = Geometry::of(shape, layer);
        let (i, o, r) = (shape.in_features, shape.out_features, shape.rank);
        let w_bound = 1.0 / (geo.fan_in as f64).sqrt();
        let mut x = geo.draw_x(&mut rng, layer, i);
        // A profile that redraws the weight below skips its natural draw: a uniform draw is two
        // words a value, so stepping over them leaves every later draw where it always was,
        // without holding a weight-sized buffer that is thrown away.
        let mut weight = match layer {
            Layer::Embedding => Recipe::normal(&mut rng, geo.w.clone(), Tag::Weight),
            _ => Recipe::uniform(&mut rng, geo.w.clone(), w_bound),
        };
        let bias = uniform(&mut rng, vec![o], w_bound);
        let mut lora_a = uniform(&mut rng, geo.a.clone(), w_bound);
        let lora_b = uniform(&mut rng, geo.b.clone(), 1.0 / (r as f64).sqrt());
        let magnitude_factor = (0..o).map(|_| rng.random_range(0.8..1.2)).collect();
        let grad_output = normal(&mut rng, geo.g.clone(), Tag::GradOutput);
        let natural = match layer {
            Layer::Embedding => 1.0,
            _ => w_bound,
        };
        if profile == Profile::Llm {
            weight = Recipe::normal(&mut rng, geo.w.clone(), Tag::LlmWeight);
            weight.scale = 0.02;
        }
        if let Some(s) = profile_scale(profile) {
            weight = Recipe::uniform(&mut rng, geo.w.clone(), s);
            let f = s / natural;
            lora_a.data.iter_mut().for_each(|v| *v *= f);
            if layer != Layer::Embedding {
                x.data.iter_mut().for_each(|v| *v /= f);
            }
        }
        let weight = Weight::Drawn {
            recipe: Box::new(weight),
            zero_rows: profile == Profile::ZeroRows,
        };
        // Last, so that every other draw is where it always was.
        let lora_bias = shape
            .lora_bias
            .then(|| uniform(&mut rng, vec![o], 1.0 / (r as f64).sqrt()));
        Draws {
            lora_bias,
            lr: shape.lr,
            layer,
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            magnitude_factor,
            grad_output,
            scaling: shape.scaling(),
            bias_on: shape.bias && layer != Layer::Embedding,
            magnitude: None,
        }
    }

    /// A checkpoint layer's inputs: its stored weight and bias, and its saved adapter's A, B and
    /// magnitude when it has one; what the checkpoint does not give (the activations and the
    /// upstream gradient always; A and B without an adapter, drawn as for a drawn layer; the
    /// magnitude's perturbation) comes from the seed, by the layer's shape name. The error
    /// says what could not be read.
    pub fn from_checkpoint(
        shape: &Shape,
        source: &CheckpointLayer,
        seed: u64,
    ) -> Result<Draws, String> {
        let stored = source.read()?;
        let layer = source.layer;
        let mut rng = ChaCha8Rng::seed_from_u64(fnv1a_from(seed, shape.name.as_bytes()));
        let geo = Geometry::of(shape, layer);
        let x = geo.draw_x(&mut rng, layer, shape.in_features);
        let w_bound = 1.0 / (geo.fan_in as f64).sqrt();
        let drawn_a = uniform(&mut rng, geo.a.clone(), w_bound);
        let drawn_b = uniform(&mut rng, geo.b.clone(), 1.0 / (shape.rank as f64).sqrt());
        let o = shape.out_features;
        let magnitude_factor = (0..o).map(|_| rng.random_range(0.8..1.2)).collect();
        let grad_output = normal(&mut rng, geo.g.clone(), Tag::GradOutput);
        let (lora_a, lora_b, magnitude) = match stored.adapter {
            Some((a, b, m)) => (a, b, m),
            None => (drawn_a, drawn_b, None),
        };
        Ok(Draws {
            layer,
            x,
            bias_on: stored.bias.is_some(),
            bias: stored.bias.unwrap_or_else(|| HostTensor::zeros(vec![o])),
            weight: Weight::Stored(stored.weight),
            lora_a,
            lora_b,
            magnitude_factor,
            grad_output,
            scaling: shape.scaling(),
            magnitude,
            lora_bias: None,
            lr: shape.lr,
        })
    }

    /// How many of a checkpoint weight's stored values rounding into `dtype` changes; `None`
    /// for a drawn weight.
    pub fn weight_rounded(&self, dtype: DType) -> Option<usize> {
        match &self.weight {
            // Stored values are a checkpoint's: a drawn weight is always a recipe.
            Weight::Stored(w) => Some(crate::checkpoint::rounded_count(w, dtype)),
            _ => None,
        }
    }

    /// The weight rounded into `dtype`, for every case of that dtype (see [`Rounded`]).
    pub fn round(&self, dtype: DType) -> Rounded {
        let (shape, n) = match &self.weight {
            Weight::Stored(w) => (w.shape.clone(), w.data.len()),
            Weight::Drawn { recipe, .. } => (recipe.shape.clone(), recipe.len()),
        };
        // DoRA's rows: output rows (channels) of a Linear (Conv2d) weight, the embedding
        // dimensions (columns) of an Embedding's.
        let cols = n / shape[0].max(1);
        let embedding = self.layer == Layer::Embedding;
        let zero = |idx: usize| {
            if embedding {
                (idx % cols).is_multiple_of(4)
            } else {
                (idx / cols).is_multiple_of(4)
            }
        };
        let mut data = vec![0.0; n];
        parallel::map_chunks(&mut data, CHUNK, n, parallel::threads(), |k, c| {
            match &self.weight {
                Weight::Stored(w) => c.copy_from_slice(&w.data[k * CHUNK..k * CHUNK + c.len()]),
                Weight::Drawn { recipe, zero_rows } => {
                    recipe.fill(k, c);
                    if *zero_rows {
                        for (j, v) in c.iter_mut().enumerate() {
                            if zero(k * CHUNK + j) {
                                *v = 0.0;
                            }
                        }
                    }
                }
            }
            c.iter_mut().for_each(|v| *v = dtype.round(*v));
        });
        Rounded {
            dtype,
            weight: Arc::new(HostTensor::new(shape, data)),
            magnitude: Default::default(),
        }
    }

    /// The inputs of one case, every tensor rounded once into `dtype`.
    pub fn inputs(&self, dtype: DType, adapter: Adapter, op: Op) -> Inputs {
        self.inputs_with(&self.round(dtype), adapter, op)
    }

    /// The inputs of one case of `rounded`'s dtype, on its weight.
    pub fn inputs_with(&self, rounded: &Rounded, adapter: Adapter, op: Op) -> Inputs {
        let dtype = rounded.dtype;
        let weight = Arc::clone(&rounded.weight);
        let at_init = matches!(op, Op::Init | Op::InitNoop);
        let zeros = |t: &HostTensor| HostTensor::zeros(t.shape.clone());
        let (lora_a, lora_b) = if adapter.is_data_init() {
            (zeros(&self.lora_a), zeros(&self.lora_b))
        } else if at_init && self.layer == Layer::Embedding {
            // PEFT zeroes an Embedding's A (lora_embedding_A) and draws its B.
            (zeros(&self.lora_a), self.lora_b.rounded(dtype))
        } else if at_init {
            (self.lora_a.rounded(dtype), zeros(&self.lora_b))
        } else {
            (self.lora_a.rounded(dtype), self.lora_b.rounded(dtype))
        };
        let saved = self
            .magnitude
            .as_ref()
            .filter(|_| adapter.is_dora() && !at_init)
            .map(|m| m.rounded(dtype));
        let magnitude = saved.or_else(|| {
            (adapter.is_dora() && !at_init).then(|| {
                // The same for every op and adapter of this dtype with these A and B.
                let memo = &rounded.magnitude[usize::from(adapter.is_data_init())];
                memo.get_or_init(|| {
                    // The DoRA norm of W + s B A from the rounded tensors, perturbed, then rounded.
                    let norm = reference::layer_weight_norm(
                        self.layer,
                        &weight,
                        &lora_a,
                        &lora_b,
                        self.scaling,
                    );
                    let data = norm
                        .data
                        .iter()
                        .zip(&self.magnitude_factor)
                        .map(|(n, f)| dtype.round(n * f))
                        .collect();
                    HostTensor::new(norm.shape.clone(), data)
                })
                .clone()
            })
        });
        Inputs {
            layer: self.layer,
            // Token ids are integers, exact in every dtype's transport (sent as f32).
            x: if self.layer == Layer::Embedding {
                self.x.clone()
            } else {
                self.x.rounded(dtype)
            },
            weight,
            bias: self.bias_on.then(|| self.bias.rounded(dtype)),
            lora_a,
            lora_b,
            magnitude,
            grad_output: self.grad_output.rounded(dtype),
            lora_bias: self.lora_bias.as_ref().map(|b| {
                if at_init {
                    zeros(b)
                } else {
                    b.rounded(dtype)
                }
            }),
            scaling: self.scaling,
            lr: self.lr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape::new("s", 4, 64, 32, 8, 16.0)
    }

    fn weight(layer: Layer, profile: Profile) -> HostTensor {
        Draws::generate(&shape(), layer, profile, 1)
            .inputs(DType::F32, Adapter::Dora, Op::Forward)
            .weight
            .as_ref()
            .clone()
    }

    /// Every fourth row in DoRA's sense is exactly zero: output rows of a Linear layer and
    /// output channels of a Conv2d, embedding dimensions (columns) of an Embedding.
    #[test]
    fn zero_rows_zero_the_rows_dora_normalises() {
        let w = weight(Layer::Linear, Profile::ZeroRows);
        for (i, row) in w.data.chunks(64).enumerate() {
            assert_eq!(row.iter().all(|v| *v == 0.0), i % 4 == 0, "row {i}");
        }
        let w = weight(Layer::Conv2d, Profile::ZeroRows);
        assert_eq!(w.shape, vec![32, 64, 3, 3]);
        for (i, ch) in w.data.chunks(64 * 9).enumerate() {
            assert_eq!(ch.iter().all(|v| *v == 0.0), i % 4 == 0, "channel {i}");
        }
        let w = weight(Layer::Embedding, Profile::ZeroRows);
        assert_eq!(w.shape, vec![64, 32]);
        for j in 0..32 {
            let col_zero = (0..64).all(|i| w.data[i * 32 + j] == 0.0);
            assert_eq!(col_zero, j % 4 == 0, "dimension {j}");
        }
    }

    /// `large`: entries up to 300, whose 64 squares sum past fp16's 65504 while the row norm
    /// (~1400) fits; `tiny`: entries up to 1e-4, whose squares (< 1e-8) are below fp16's
    /// smallest subnormal (6e-8); `llm`: N(0, 0.02). x is scaled inversely, so the outputs keep
    /// the normal profile's range.
    #[test]
    fn profiles_have_the_advertised_scale() {
        let large = weight(Layer::Linear, Profile::Large);
        let m = large.max_abs();
        assert!(m > 250.0 && m <= 300.0, "{m}");
        let sq: f64 = large.data[..64].iter().map(|v| v * v).sum();
        assert!(sq > 65504.0 && sq.sqrt() < 65504.0, "{sq}");
        let tiny = weight(Layer::Linear, Profile::Tiny);
        let m = tiny.max_abs();
        assert!(m > 0.5e-4 && m <= 1e-4, "{m}");
        assert!(tiny.data.iter().all(|v| v * v < 6e-8));
        let llm = weight(Layer::Linear, Profile::Llm);
        let var = llm.data.iter().map(|v| v * v).sum::<f64>() / llm.data.len() as f64;
        assert!((var.sqrt() - 0.02).abs() < 0.002, "{}", var.sqrt());
        // Outputs keep their range: x W^T is about as large under every profile.
        let out = |p: Profile| {
            let i = Draws::generate(&shape(), Layer::Linear, p, 1).inputs(
                DType::F64,
                Adapter::Lora,
                Op::Forward,
            );
            crate::truth::reference::compute(Adapter::Lora, Op::Forward, &i)[0]
                .1
                .max_abs()
        };
        let normal = out(Profile::Normal);
        for p in [Profile::Large, Profile::Tiny] {
            let r = out(p) / normal;
            assert!((0.2..5.0).contains(&r), "{p}: {r}");
        }
    }

    /// The drawn inputs do not depend on how many threads draw them, and a uniform draw is
    /// the very sequence one sequential stream gives (the parallel chunks seek into it).
    #[test]
    fn draws_do_not_depend_on_the_thread_count() {
        let big = Shape {
            in_features: 512,
            out_features: 1024,
            ..shape()
        };
        let draw = |threads: usize, profile: Profile| {
            parallel::set_threads(threads);
            Draws::generate(&big, Layer::Linear, profile, 7)
        };
        for profile in [Profile::Normal, Profile::Llm] {
            let one = draw(1, profile);
            for threads in [2, 3, 8] {
                let many = draw(threads, profile);
                assert_eq!(
                    one.round(DType::F64).weight,
                    many.round(DType::F64).weight,
                    "{profile} on {threads} threads"
                );
                assert_eq!(one.lora_a, many.lora_a);
                assert_eq!(one.grad_output, many.grad_output);
            }
        }
        // The normal profile's weight is the first draw after x: replay it sequentially.
        let mut rng = ChaCha8Rng::seed_from_u64(fnv1a_from(7, big.name.as_bytes()));
        for _ in 0..4 * 512 {
            let _: f64 = StandardNormal.sample(&mut rng);
        }
        let bound = 1.0 / 512f64.sqrt();
        let sequential: Vec<f64> = (0..1024 * 512)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        assert_eq!(
            draw(4, Profile::Normal).round(DType::F64).weight.data,
            sequential
        );
        // The llm weight has N(0, 0.02) statistics in every chunk, not just the first.
        let llm = draw(4, Profile::Llm).round(DType::F64).weight;
        for chunk in llm.data.chunks(CHUNK) {
            let sd = (chunk.iter().map(|v| v * v).sum::<f64>() / chunk.len() as f64).sqrt();
            assert!((sd - 0.02).abs() < 0.001, "{sd}");
        }
    }

    /// Each (layer, profile) draws from its own stream (the linear, normal draws are those of
    /// earlier versions: the default matrix's snapshot gate holds them).
    #[test]
    fn profiles_draw_their_own_inputs() {
        let a = Draws::generate(&shape(), Layer::Linear, Profile::Normal, 1).inputs(
            DType::F32,
            Adapter::Lora,
            Op::Forward,
        );
        let b = Draws::generate(&shape(), Layer::Linear, Profile::ZeroRows, 1).inputs(
            DType::F32,
            Adapter::Lora,
            Op::Forward,
        );
        assert_ne!(a.x, b.x);
    }
}
