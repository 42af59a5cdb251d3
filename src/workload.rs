//! Seeded synthetic workloads: the default job's, the benchmarks', the examples' and anyone's
//! who wants to measure xent (or a peer) on the same data on any machine.

use ndarray::{Array1, Array2};
use rayon::prelude::*;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Logits `[n, v]` with roughly normal entries of standard deviation `scale`, and targets
/// drawn uniformly from `0..v` with every `ignore_every`-th row set to `-100` (0: none).
/// The same seed gives the same data on every machine and thread count.
///
/// ```
/// let (x, t) = xent::workload::synthetic(4, 10, 2.0, 3, 7);
/// assert_eq!(x.dim(), (4, 10));
/// assert_eq!(t[2], -100);
/// ```
pub fn synthetic(n: usize, v: usize, scale: f32, ignore_every: usize, seed: u64) -> (Array2<f32>, Array1<i64>) {
    try_synthetic(n, v, scale, ignore_every, seed).expect("memory for the synthetic workload")
}

/// [`synthetic`] with the allocation checked: a shape that cannot be allocated is an error.
pub fn try_synthetic(
    n: usize,
    v: usize,
    scale: f32,
    ignore_every: usize,
    seed: u64,
) -> crate::Result<(Array2<f32>, Array1<i64>)> {
    let mut x = crate::alloc::zeros2::<f32>((n, v), "synthetic logits")?;
    if v > 0 {
        x.as_slice_mut().expect("fresh array").par_chunks_mut(v).enumerate().for_each(|(r, row)| {
            let mut s = mix(seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for e in row.iter_mut() {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let b = mix(s);
                // Sum of four 16-bit uniforms: mean 2, variance 4/12; rescaled to unit variance.
                let u = (b & 0xFFFF) + ((b >> 16) & 0xFFFF) + ((b >> 32) & 0xFFFF) + (b >> 48);
                let z = (u as f32 / 65536.0 - 2.0) * 1.732_050_8;
                *e = z * scale;
            }
        });
    }
    let t = Array1::from_shape_fn(n, |r| {
        if ignore_every > 0 && r % ignore_every == ignore_every - 1 {
            -100
        } else {
            (mix(seed.wrapping_add(0xDEAD_BEEF) ^ r as u64) % v.max(1) as u64) as i64
        }
    });
    Ok((x, t))
}
