//! The two 8-bit float formats of torch's `float8_e4m3fn` and `float8_e5m2` (OCP FP8): rounding
//! an f64 into them (nearest, ties to even, as ATen's casts do) and their one-byte encoding.
//! Written here rather than taken from a crate: the kit is also built against every older tch
//! with its own lock file, and these are twenty lines.

/// One 8-bit format: `mbits` stored mantissa bits, exponent `bias`, smallest normal exponent
/// `emin`, largest finite value `max`, and whether it has infinities (e5m2) or only NaN
/// (e4m3fn: a value past `max` becomes NaN, as ATen's cast makes it).
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub mbits: i32,
    pub bias: i32,
    pub emin: i32,
    pub max: f64,
    pub has_inf: bool,
}

pub const E4M3FN: Format = Format {
    mbits: 3,
    bias: 7,
    emin: -6,
    max: 448.0,
    has_inf: false,
};

pub const E5M2: Format = Format {
    mbits: 2,
    bias: 15,
    emin: -14,
    max: 57344.0,
    has_inf: true,
};

/// The binary exponent of a positive normal f64 (floor(log2 a), exactly).
fn exponent(a: f64) -> i32 {
    ((a.to_bits() >> 52) & 0x7ff) as i32 - 1023
}

impl Format {
    /// `v` rounded to the nearest value of this format (ties to even), as an f64 (exact).
    pub fn round(self, v: f64) -> f64 {
        if v.is_nan() || v == 0.0 {
            return v;
        }
        let a = v.abs();
        let q = 2f64.powi(exponent(a).max(self.emin) - self.mbits);
        let r = (a / q).round_ties_even() * q;
        let r = if r <= self.max {
            r
        } else if self.has_inf {
            f64::INFINITY
        } else {
            f64::NAN
        };
        r.copysign(v)
    }

    /// The byte of a value of this format (one [`Format::round`] returned).
    pub fn to_bits(self, v: f64) -> u8 {
        let sign = if v.is_sign_negative() { 0x80 } else { 0 };
        let a = v.abs();
        let mag = if a.is_nan() {
            0x7f
        } else if a.is_infinite() {
            0x7c
        } else if a == 0.0 {
            0
        } else {
            let e = exponent(a);
            if e < self.emin {
                (a / 2f64.powi(self.emin - self.mbits)) as u8
            } else {
                let mant = a / 2f64.powi(e - self.mbits) - 2f64.powi(self.mbits);
                (((e + self.bias) << self.mbits) as u8) | mant as u8
            }
        };
        sign | mag
    }

    /// The value of a byte of this format.
    pub fn from_bits(self, b: u8) -> f64 {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let field = i32::from((b & 0x7f) >> self.mbits);
        let mant = f64::from(b & ((1 << self.mbits) - 1));
        let top = (1 << (7 - self.mbits)) - 1;
        if field == top && (self.has_inf || mant == f64::from((1 << self.mbits) - 1)) {
            return match (self.has_inf, mant == 0.0) {
                (true, true) => sign * f64::INFINITY,
                _ => f64::NAN,
            };
        }
        let mag = if field == 0 {
            mant * 2f64.powi(self.emin - self.mbits)
        } else {
            (1.0 + mant / 2f64.powi(self.mbits)) * 2f64.powi(field - self.bias)
        };
        sign * mag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values checked against torch 2.11 (`torch.tensor(v).to(torch.float8_e4m3fn).item()`).
    #[test]
    fn rounds_like_aten() {
        assert_eq!(E4M3FN.round(0.1), 0.1015625);
        assert_eq!(E5M2.round(0.1), 0.09375);
        assert_eq!(E4M3FN.round(300.0), 288.0);
        assert_eq!(E4M3FN.round(-1e-3), -0.001953125);
        assert_eq!(E5M2.round(1e-5), 1.52587890625e-05);
        assert!(E4M3FN.round(1000.0).is_nan());
        assert_eq!(E5M2.round(1e6), f64::INFINITY);
        // A tie goes to the even mantissa: 1.0625 sits between 1.0 and 1.125.
        assert_eq!(E4M3FN.round(1.0625), 1.0);
    }

    #[test]
    fn every_byte_round_trips() {
        for f in [E4M3FN, E5M2] {
            for b in 0..=255u8 {
                let v = f.from_bits(b);
                if v.is_nan() {
                    continue;
                }
                assert_eq!(f.round(v), v, "byte {b:#x}");
                assert_eq!(f.to_bits(v), b, "value {v}");
            }
        }
    }
}
