//! Linear log-probs and entropies on the GPU: per chunk of rows, `Z = H_c W^T + b` by the
//! product kernel into a `[chunk, V]` f32 workspace (`super::linear::LinearDev`), the row
//! kernel `shaders/logprobs.wgsl` (per-row log-prob and entropy, and with an upstream gradient
//! `Z` overwritten by `G = d loss / d Z`), then `grad_hidden[c] = G W`, `grad_weight += G^T
//! H_c` and `grad_bias += 1^T G` by the same products as the fused linear cross-entropy. Chunks
//! and vocabulary blocks run in order: the same bits on every run. The math is in
//! [`crate::api::logprobs`].

use ndarray::{Array1, Array2, ArrayView1};

use super::linear::{GradOut, LinearDev};
use super::rows;
use crate::api::linear::{counted_rows, gather_batch, scatter_rows};
use crate::api::logprobs::{check, counted, LinearLogprobs, LinearLogprobsOutput, LogprobsCall};
use crate::api::targets::DEVICE_IGNORED;
use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::context::{GpuContext, Kernel};
use crate::gpu::launch::{Bind, Launch, Recorder, Skip};
use crate::gpu::params::{flag_bits, mirror, Block, Header};
use crate::gpu::pool::Pooled;
use crate::gpu::variant::{Binding, Family, Shader, Variant};
use crate::parallel::agree;
use crate::parallel::vocab::{logprob_row, merge_logprobs, Sharded, VocabShard, LP_REC};

use wgpu::BufferUsages as U;

flag_bits! {
    /// Linear log-probs' flag bits (`LP_*` in `shaders/logprobs.wgsl`).
    pub(crate) mod lp_flags("LP_") {
        /// The columns are a vocabulary shard (classes `class0 ..`): the pass writes each
        /// row's record of the shard instead of its log-prob and entropy.
        SHARD = 1,
        /// The gradient pass reads each row's merged record instead of computing its statistic.
        FROM_SAVED = 2,
    }
}

mirror! {
    /// The log-probs row pass's parameters; mirrors `LogprobsParams` in `shaders/logprobs.wgsl`.
    pub(crate) struct LogprobsParams {
        pub head: Header,
        pub ignore_index: i32,
        pub inv_temp: f32,
        /// The first class of a vocabulary shard (0 without one).
        pub class0: u32,
    }
}

impl Block for LogprobsParams {
    fn head(&self) -> &Header {
        &self.head
    }
}

/// The log-probs kernel: f32 logits (slot 1; the gradient over them in place), the targets,
/// the per-row log-prob and entropy (or shard records) in the row values, and in place the
/// upstream `[a; b]`.
pub(crate) const FAMILY: Family = Family {
    io: &[rows::WGSL],
    bindings: |_, v| {
        const TARGETS: Binding = (2, true, "targets");
        const UPSTREAM: Binding = (4, true, "upstream");
        let mut b = vec![rows::input(v), TARGETS, rows::ROW_VALUES];
        if v.in_place {
            b.push(UPSTREAM);
        }
        b
    },
    // Vectors of four where V is a multiple of 4 (`logprobs_kernel`).
    #[cfg(test)]
    variants: |_| rows::keep(|v| !v.grad && !v.odd && v.input == DType::F32 && rows::f32_second_and_output(v)),
};

impl GpuContext {
    /// [`Self::linear_logprobs`]'s work here (the public method: `crate::api::methods`).
    pub(crate) fn logprobs_run(&self, call: LogprobsCall<'_>) -> Result<LinearLogprobsOutput> {
        let c = check(&call, None)?;
        let LogprobsCall { hidden, weight, bias, targets, cfg, .. } = call;
        let (n, d, v) = (c.n, hidden.dim().1, c.v);
        // Ignored rows cost nothing (as on the CPU): the counted ones go up as a batch of their
        // own, and their rows come back to their places.
        if let Some(kept) = counted_rows(&hidden, &targets, &c.lc) {
            let (h, t, _) = gather_batch(&hidden, &targets, None, &kept);
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
            return Ok(c.output((vec![0.0; n], vec![0.0; n]), count, g, dt, c.lc.device_chunk_rows(n, v)));
        }
        let dev = LinearDev::new(self, &hidden, &weight, bias)?;
        let rows = dev.chunk_rows(self, c.lc.device_chunk_rows(n, v))?;
        let chunk = rows.min(n) as u64;
        // Targets as i32, ignored rows -1 (every other one was checked to be a class index).
        let ti: Vec<i32> =
            (0..n).map(|r| targets.get(r)).map(|y| if y == cfg.ignore_index { -1 } else { y as i32 }).collect();
        let tb = self.upload(bytemuck::cast_slice(&ti), U::STORAGE | U::COPY_SRC, "targets")?;
        let tchunk = self.take(chunk * 4, U::STORAGE | U::COPY_DST, "targets chunk")?;
        let up = self.upstream_buffers(c.upstream.filter(|_| grads), chunk)?;
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
        let kernel = self.logprobs_kernel(v, rows.min(n), up.is_some())?;
        for r0 in (0..n).step_by(rows) {
            let b = rows.min(n - r0);
            let (r0u, bu) = (r0 as u64, b as u64);
            let mut enc = self.inner.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&tb, r0u * 4, &tchunk, 0, bu * 4);
            if let Some((whole, part)) = &up {
                copy_upstream(&mut enc, (whole, part), n, r0, b);
            }
            let mut rec = Recorder::new(self);
            dev.record_logits(self, &mut rec, &z, r0, b)?;
            let base = LogprobsParams {
                head: Header::new(b, v),
                ignore_index: -1,
                inv_temp: 1.0 / cfg.temperature,
                class0: 0,
            };
            let part = up.as_ref().map(|(_, part)| part);
            rec.push(logprobs_launch(&kernel, base, (&z, &tchunk, &rv), part, 2 * bu * 4))?;
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

    /// The row kernel of linear log-probs over `[rows, v]` f32 logits (`in_place`: the gradient
    /// over them).
    fn logprobs_kernel(&self, v: usize, rows: usize, in_place: bool) -> Result<std::sync::Arc<Kernel>> {
        let variant = Variant {
            input: DType::F32,
            // Rows of the workspace start at element multiples of V: vectors of four where V is one.
            vec4: super::row_vectors(self.inner.wide_loads, v, v, &[(DType::F32, 0)]).0,
            subgroup: self.inner.subgroups,
            in_place,
            wg: self.ce_layout(rows, v, true).0,
            ..Default::default()
        };
        self.kernel(Shader::Logprobs, variant)
    }

    /// The upstream gradient `[a (N); b (N)]` on the device, and room for a chunk's `[a; b]`
    /// (which the row kernel reads).
    fn upstream_buffers(
        &self,
        upstream: Option<(ArrayView1<'_, f32>, ArrayView1<'_, f32>)>,
        chunk: u64,
    ) -> Result<Option<(Pooled, Pooled)>> {
        let Some((a, b)) = upstream else { return Ok(None) };
        let ab: Vec<f32> = a.iter().chain(b.iter()).copied().collect();
        let whole = self.upload(bytemuck::cast_slice(&ab), U::STORAGE | U::COPY_SRC, "upstream")?;
        Ok(Some((whole, self.take(2 * chunk * 4, U::STORAGE | U::COPY_DST, "upstream chunk")?)))
    }

    /// [`Self::linear_logprobs_vocab_parallel`]'s work here (the public method:
    /// `crate::api::methods`).
    pub(crate) fn logprobs_vocab(&self, call: LogprobsCall<'_>, sh: Sharded<'_>) -> Result<LinearLogprobsOutput> {
        let (LogprobsCall { hidden, weight, bias, targets, cfg, upstream: _ }, Sharded { shard, comm }) = (call, sh);
        // Checks, uploads and the first pass; then one agreement before any collective.
        let prep = (|| -> Result<_> {
            let c = check(&call, Some(shard))?;
            let (n, vl) = (c.n, c.v);
            let ti = targets.device_classes(shard.classes, cfg.ignore_index)?;
            // No rows or no classes here: no device work (records of no classes, no gradient).
            let dev = (n > 0 && vl > 0).then(|| LinearDev::new(self, &hidden, &weight, bias)).transpose()?;
            let rows = match &dev {
                Some(dev) => dev.chunk_rows(self, c.lc.device_chunk_rows(n, vl))?.min(n),
                None => n.max(1),
            };
            let tb = self.upload(bytemuck::cast_slice(&ti), U::STORAGE | U::COPY_SRC, "targets")?;
            Ok(ShardPrep { c, dev, rows, tb })
        })();
        let local = prep.as_ref().map_err(Clone::clone).and_then(|p| self.logprobs_shard_pass(p, cfg, shard, None));
        let mut rec = agree(comm, local)?;
        let p = prep?;
        comm.all_reduce_with(&mut rec, LP_REC, merge_logprobs)?;
        let (n, vl, d) = (p.c.n, p.c.v, hidden.dim().1);
        let (mut logp, mut ent) = (vec![0f32; n], vec![0f32; n]);
        for (r, x) in rec.chunks(LP_REC).enumerate().filter(|&(r, _)| targets.get(r) != cfg.ignore_index) {
            (logp[r], ent[r], _) = logprob_row(x);
        }
        let has_bias = bias.is_some();
        let gflags = (p.c.lc.grad_hidden, p.c.lc.grad_weight, p.c.lc.grad_bias && has_bias);
        let out = |what: &str, on: bool, elems: usize| {
            on.then(|| self.take(elems.max(1) as u64 * 4, U::STORAGE | U::COPY_SRC, what)).transpose()
        };
        let gh = out("grad_hidden", gflags.0, n * d)?;
        let gw = out("grad_weight", gflags.1, vl * d)?;
        let gb = out("grad_bias", gflags.2, vl)?;
        if p.c.any_grad(has_bias) && p.dev.is_some() {
            let ones = self.upload(bytemuck::cast_slice(&vec![1f32; p.rows]), U::STORAGE, "ones")?;
            let outs = GradOut { gh: gh.as_ref(), gw: gw.as_ref(), gb: gb.as_ref(), ones: &ones };
            self.logprobs_shard_pass(&p, cfg, shard, Some((&rec, &outs)))?;
        }
        let read = |buf: Option<&Pooled>, elems: usize| -> Result<Option<Vec<f32>>> {
            let Some(buf) = buf else { return Ok(None) };
            let mut out = vec![0f32; elems];
            // (Without a pass over this shard the buffers hold nothing: the gradients are 0.)
            if elems > 0 && p.dev.is_some() && p.c.any_grad(has_bias) {
                self.read_back(buf, 0, bytemuck::cast_slice_mut(&mut out), None)?;
            }
            Ok(Some(out))
        };
        let mut gh = read(gh.as_ref(), n * d)?;
        // Every shard's share of d(loss)/d(hidden), summed.
        if let Some(g) = gh.as_mut() {
            comm.all_reduce_sum_f32(g)?;
        }
        let mat = |v: Option<Vec<f32>>, dim| v.map(|v| Array2::from_shape_vec(dim, v).expect("shape"));
        let g = (mat(gh, (n, d)), mat(read(gw.as_ref(), vl * d)?, (vl, d)), read(gb.as_ref(), vl)?);
        let count = counted(&targets, cfg.ignore_index);
        Ok(p.c.output((logp, ent), count, g, hidden.dtype(), p.rows))
    }

    /// One pass over the row chunks of a vocabulary shard: `Z` for each, then its records of
    /// the shard (`grad: None`; the records, [`LP_REC`] f64 per row, are returned) or, from
    /// the merged records, the gradient over `Z` and the products (returns nothing).
    fn logprobs_shard_pass(
        &self,
        p: &ShardPrep<'_>,
        cfg: &LinearLogprobs,
        shard: VocabShard,
        grad: Option<(&[f64], &GradOut<'_>)>,
    ) -> Result<Vec<f64>> {
        let n = p.c.n;
        let Some(dev) = &p.dev else {
            // No classes here (or no rows): each row's record is empty.
            return Ok(if grad.is_none() { [f64::NEG_INFINITY, 0.0, 0.0, 0.0].repeat(n) } else { Vec::new() });
        };
        let (vl, chunk) = (p.c.v, p.rows as u64);
        let up = match grad {
            Some(_) => self.upstream_buffers(p.c.upstream, chunk)?,
            None => None,
        };
        let z = self.take(chunk * vl as u64 * 4, U::STORAGE | U::COPY_SRC, "logprobs workspace")?;
        let tchunk = self.take(chunk * 4, U::STORAGE | U::COPY_DST, "targets chunk")?;
        let rv = self.take(LP_REC as u64 * chunk * 4, U::STORAGE | U::COPY_SRC | U::COPY_DST, "shard records")?;
        let all = match grad {
            None => Some(self.take(LP_REC as u64 * n as u64 * 4, U::STORAGE | U::COPY_DST | U::COPY_SRC, "records")?),
            Some(_) => None,
        };
        let kernel = self.logprobs_kernel(vl, p.rows, grad.is_some())?;
        let mut extra = lp_flags::SHARD;
        if grad.is_some() {
            extra |= lp_flags::FROM_SAVED;
        }
        for r0 in (0..n).step_by(p.rows) {
            let b = p.rows.min(n - r0);
            let (r0u, bu) = (r0 as u64, b as u64);
            let mut enc = self.inner.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&p.tb, r0u * 4, &tchunk, 0, bu * 4);
            if let Some((whole, part)) = &up {
                copy_upstream(&mut enc, (whole, part), n, r0, b);
            }
            if let Some((merged, _)) = grad {
                // The merged records where the gradient pass reads them.
                let m: Vec<f32> = merged[r0 * LP_REC..(r0 + b) * LP_REC].iter().map(|&x| x as f32).collect();
                self.write(&rv, 0, bytemuck::cast_slice(&m))?;
            }
            let mut rec = Recorder::new(self);
            dev.record_logits(self, &mut rec, &z, r0, b)?;
            let mut base = LogprobsParams {
                head: Header::new(b, vl),
                ignore_index: DEVICE_IGNORED,
                inv_temp: 1.0 / cfg.temperature,
                class0: shard.class0 as u32,
            };
            base.head.flags |= extra;
            let part = up.as_ref().map(|(_, part)| part);
            rec.push(logprobs_launch(&kernel, base, (&z, &tchunk, &rv), part, LP_REC as u64 * bu * 4))?;
            if let Some((_, outs)) = grad {
                dev.record_grads(self, &mut rec, &z, r0, b, outs)?;
            }
            let params = rec.params_pooled()?;
            rec.record(&mut enc, &params)?;
            if let Some(all) = &all {
                enc.copy_buffer_to_buffer(&rv, 0, all, r0u * LP_REC as u64 * 4, LP_REC as u64 * bu * 4);
            }
            // One submission per chunk, waited for: the workspace is reused.
            let idx = self.submit(enc)?;
            self.wait(idx)?;
        }
        let Some(all) = all else { return Ok(Vec::new()) };
        let mut raw = vec![0f32; LP_REC * n];
        self.read_back(&all, 0, bytemuck::cast_slice_mut(&mut raw), None)?;
        Ok(raw.into_iter().map(f64::from).collect())
    }
}

/// What both passes over a vocabulary shard use: the checked call, the inputs on the device
/// (none without rows or classes), rows per chunk, the targets.
struct ShardPrep<'u> {
    c: crate::api::logprobs::Checked<'u>,
    dev: Option<LinearDev>,
    rows: usize,
    tb: Pooled,
}

/// The row kernel's launch over a chunk: logits `z`, targets, row results (`rv_bytes` of
/// `rv`) and, for a gradient, the chunk's upstream `[a; b]`.
fn logprobs_launch<'a>(
    kernel: &std::sync::Arc<Kernel>,
    base: LogprobsParams,
    (z, tchunk, rv): (&'a Pooled, &'a Pooled, &'a Pooled),
    up: Option<&'a Pooled>,
    rv_bytes: u64,
) -> Launch<'a> {
    let (b, v) = (base.head.n_rows as usize, base.head.v as usize);
    let mut l = Launch::new(kernel.clone(), base, b, v)
        .rows(1, z, 0, 4, Skip::X)
        .bind(2, Bind::first(tchunk, b as u64 * 4))
        .bind(6, Bind::first(rv, rv_bytes));
    if let Some(part) = up {
        l = l.bind(4, Bind::first(part, 2 * b as u64 * 4));
    }
    l
}

/// Copies rows `r0 .. r0 + b` of the upstream gradient `[a (n); b (n)]` into a chunk's `[a; b]`.
fn copy_upstream(enc: &mut wgpu::CommandEncoder, (whole, part): (&Pooled, &Pooled), n: usize, r0: usize, b: usize) {
    let (r0, b, n) = (r0 as u64, b as u64, n as u64);
    enc.copy_buffer_to_buffer(whole, r0 * 4, part, 0, b * 4);
    enc.copy_buffer_to_buffer(whole, (n + r0) * 4, part, b * 4, b * 4);
}

#[cfg(test)]
mod interface_tests {
    use super::*;
    use crate::gpu::params::tests::check_family;

    /// The family's parameters and flag bits declared here are what its WGSL declares.
    #[test]
    fn the_family_interface_matches_its_wgsl() {
        check_family::<LogprobsParams>(Shader::Logprobs, "LogprobsParams", Some((lp_flags::PREFIX, lp_flags::ALL)));
    }
}
