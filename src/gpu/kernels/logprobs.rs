//! Linear log-probs and entropies on the GPU: per chunk of rows, `Z = H_c W^T + b` by the
//! product kernel into a `[chunk, V]` f32 workspace (`super::linear::LinearDev`), the row
//! kernel `shaders/logprobs.wgsl` (per-row log-prob and entropy, and with an upstream gradient
//! `Z` overwritten by `G = d loss / d Z`), then `grad_hidden[c] = G W`, `grad_weight += G^T
//! H_c` and `grad_bias += 1^T G` by the same products as the fused linear cross-entropy. Chunks
//! and vocabulary blocks run in order: the same bits on every run. The math is in
//! [`crate::api::logprobs`].

use ndarray::{Array1, Array2, ArrayView1};

use super::linear::{GradOut, LinearDev};
use crate::api::linear::{counted_rows, gather_batch, scatter_rows};
use crate::api::logprobs::{check, counted, LinearLogprobs, LinearLogprobsOutput};
use crate::api::targets::Targets;
use crate::dtype::{DType, Logits};
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::launch::{Bind, Launch, Recorder, Skip};
use crate::gpu::params::{mirror, Block, Header};
use crate::gpu::pool::Pooled;
use crate::gpu::source::{Shader, Variant};

use wgpu::BufferUsages as U;

mirror! {
    /// The log-probs row pass's parameters; mirrors `LogprobsParams` in `shaders/logprobs.wgsl`.
    pub(crate) struct LogprobsParams {
        pub head: Header,
        pub ignore_index: i32,
        pub inv_temp: f32,
    }
}

impl Block for LogprobsParams {
    fn head(&self) -> &Header {
        &self.head
    }
}

impl GpuContext {
    /// Per-row log-probabilities and entropies from hidden states on the GPU: as
    /// [`crate::Cpu::linear_logprobs`] (host arrays in, host arrays out; the logits exist one
    /// row chunk at a time, on the device).
    pub fn linear_logprobs<'a, 'b, 'c>(
        &self,
        hidden: impl Into<Logits<'a>>,
        weight: impl Into<Logits<'b>>,
        bias: Option<ArrayView1<'_, f32>>,
        targets: impl Into<Targets<'c>>,
        cfg: &LinearLogprobs,
        upstream: Option<(ArrayView1<'_, f32>, ArrayView1<'_, f32>)>,
    ) -> Result<LinearLogprobsOutput> {
        let (hidden, weight, targets) = (hidden.into(), weight.into(), targets.into());
        let c = check(&hidden, &weight, bias, &targets, cfg, upstream)?;
        let (n, d, v) = (c.n, hidden.dim().1, c.v);
        // Ignored rows cost nothing (as on the CPU): the counted ones go up as a batch of their
        // own, and their rows come back to their places.
        if let Some(kept) = counted_rows(&hidden, &targets, &c.lc) {
            let (h, t, _) = gather_batch(&hidden, &targets, &c.lc, &kept);
            let pick = |x: ArrayView1<'_, f32>| kept.iter().map(|&r| x[r]).collect::<Array1<f32>>();
            let up = c.upstream.map(|(a, b)| (pick(a), pick(b)));
            let mut out = self.linear_logprobs(
                h.view(),
                weight,
                bias,
                t.view(),
                cfg,
                up.as_ref().map(|(a, b)| (a.view(), b.view())),
            )?;
            let place = |x: &Array1<f32>| {
                let mut all = Array1::zeros(n);
                kept.iter().zip(x).for_each(|(&r, &x)| all[r] = x);
                all
            };
            (out.logprob, out.entropy) = (place(&out.logprob), place(&out.entropy));
            out.grad_hidden = out.grad_hidden.map(|g| scatter_rows(g, &kept, n)).transpose()?;
            return Ok(out);
        }
        let has_bias = bias.is_some();
        let grads = c.any_grad(has_bias);
        let count = counted(&targets, cfg.ignore_index);
        let (gflags, dt) = ((c.lc.grad_hidden, c.lc.grad_weight, c.lc.grad_bias && has_bias), hidden.dtype());
        if n == 0 || v == 0 {
            // No rows, or no classes (every row ignored): zeros, as on the CPU.
            let z = |dim: (usize, usize), on: bool| on.then(|| Array2::zeros(dim));
            let gb = gflags.2.then(|| vec![0f32; v]);
            let g = (z((n, d), gflags.0), z((v, d), gflags.1), gb);
            return Ok(c.output((vec![0.0; n], vec![0.0; n]), count, g, dt, c.lc.chunk_rows(n, v)));
        }
        let dev = LinearDev::new(self, &hidden, &weight, bias)?;
        let rows = dev.chunk_rows(self, c.lc.chunk_rows(n, v))?;
        let chunk = rows.min(n) as u64;
        // Targets as i32, ignored rows -1 (every other one was checked to be a class index).
        let ti: Vec<i32> =
            (0..n).map(|r| targets.get(r)).map(|y| if y == cfg.ignore_index { -1 } else { y as i32 }).collect();
        let tb = self.upload(bytemuck::cast_slice(&ti), U::STORAGE | U::COPY_SRC, "targets")?;
        let tchunk = self.take(chunk * 4, U::STORAGE | U::COPY_DST, "targets chunk")?;
        // The upstream gradient [a (N); b (N)], and the chunk's [a; b] the row kernel reads.
        let up = match c.upstream.filter(|_| grads) {
            Some((a, b)) => {
                let ab: Vec<f32> = a.iter().chain(b.iter()).copied().collect();
                let whole = self.upload(bytemuck::cast_slice(&ab), U::STORAGE | U::COPY_SRC, "upstream")?;
                Some((whole, self.take(2 * chunk * 4, U::STORAGE | U::COPY_DST, "upstream chunk")?))
            }
            None => None,
        };
        let z = self.take(chunk * v as u64 * 4, U::STORAGE | U::COPY_SRC, "logprobs workspace")?;
        let rv = self.take(2 * chunk * 4, U::STORAGE | U::COPY_SRC, "logprobs rows")?;
        let rows_out = self.take(2 * n as u64 * 4, U::STORAGE | U::COPY_DST | U::COPY_SRC, "logprobs and entropies")?;
        let ones = self.upload(bytemuck::cast_slice(&vec![1f32; chunk as usize]), U::STORAGE, "ones")?;
        let out = |what: &str, on: bool, elems: usize| {
            on.then(|| self.take(elems as u64 * 4, U::STORAGE | U::COPY_SRC, what)).transpose()
        };
        let gh = out("grad_hidden", gflags.0, n * d)?;
        let gw = out("grad_weight", gflags.1, v * d)?;
        let gb = out("grad_bias", gflags.2, v)?;
        let variant = Variant {
            input: DType::F32,
            // Rows of the workspace start at element multiples of V: vectors of four where V is one.
            vec4: super::row_vectors(self.inner.wide_loads, v, v, &[(DType::F32, 0)]).0,
            subgroup: self.inner.subgroups,
            in_place: up.is_some(),
            wg: self.ce_layout(rows.min(n), v, true).0,
            ..Default::default()
        };
        let kernel = self.kernel(Shader::Logprobs, variant)?;
        for r0 in (0..n).step_by(rows) {
            let b = rows.min(n - r0);
            let (r0u, bu) = (r0 as u64, b as u64);
            let mut enc = self.inner.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&tb, r0u * 4, &tchunk, 0, bu * 4);
            if let Some((whole, part)) = &up {
                enc.copy_buffer_to_buffer(whole, r0u * 4, part, 0, bu * 4);
                enc.copy_buffer_to_buffer(whole, (n as u64 + r0u) * 4, part, bu * 4, bu * 4);
            }
            let mut rec = Recorder::new(self);
            dev.record_logits(self, &mut rec, &z, r0, b)?;
            let base = LogprobsParams { head: Header::new(b, v), ignore_index: -1, inv_temp: 1.0 / cfg.temperature };
            let mut l = Launch::new(kernel.clone(), base, b, v)
                .rows(1, &z, 0, 4, Skip::X)
                .bind(2, Bind::first(&tchunk, bu * 4))
                .bind(6, Bind::first(&rv, 2 * bu * 4));
            if let Some((_, part)) = &up {
                l = l.bind(4, Bind::first(part, 2 * bu * 4));
            }
            rec.push(l)?;
            if up.is_some() {
                let outs = GradOut { gh: gh.as_ref(), gw: gw.as_ref(), gb: gb.as_ref(), ones: &ones };
                dev.record_grads(self, &mut rec, &z, r0, b, &outs)?;
            }
            let params = rec.params_pooled()?;
            rec.record(&mut enc, &params)?;
            // The chunk's log-probs and entropies to their rows of [logprob (N); entropy (N)].
            enc.copy_buffer_to_buffer(&rv, 0, &rows_out, r0u * 4, bu * 4);
            enc.copy_buffer_to_buffer(&rv, bu * 4, &rows_out, (n as u64 + r0u) * 4, bu * 4);
            // One submission per chunk, waited for: the workspace is reused.
            let idx = self.submit(enc)?;
            self.wait(idx)?;
        }
        let read = |buf: &Pooled, elems: usize| -> Result<Vec<f32>> {
            let mut out = vec![0f32; elems];
            self.read_back(buf, 0, bytemuck::cast_slice_mut(&mut out), None)?;
            Ok(out)
        };
        let mut lp = read(&rows_out, 2 * n)?;
        let ent = lp.split_off(n);
        let mat = |buf: Option<&Pooled>, dim: (usize, usize)| -> Result<Option<Array2<f32>>> {
            buf.map(|b| Ok(Array2::from_shape_vec(dim, read(b, dim.0 * dim.1)?).expect("shape"))).transpose()
        };
        let g = (mat(gh.as_ref(), (n, d))?, mat(gw.as_ref(), (v, d))?, gb.as_ref().map(|b| read(b, v)).transpose()?);
        Ok(c.output((lp, ent), count, g, dt, rows))
    }
}

#[cfg(test)]
mod interface_tests {
    use super::*;
    use crate::gpu::params::tests::check_family;

    /// The family's parameters and flag bits declared here are what its WGSL declares.
    #[test]
    fn the_family_interface_matches_its_wgsl() {
        check_family::<LogprobsParams>(Shader::Logprobs, "LogprobsParams", None);
    }
}
