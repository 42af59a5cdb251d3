//! Cross-entropy over a logits file in row blocks, so that a file of any size streams through a
//! bounded amount of memory: a reader thread fetches the next block (positional reads) while
//! the current one is computed, and the gradient goes to its output file block by block.
//!
//! On the GPU two sets of device buffers alternate: the next block is uploaded while the
//! kernel runs on the current one, and each block's loss and gradient come back through
//! copies recorded in its own submission. Every block is a [`xent::CePlan`] record with the
//! whole batch's mean denominators ([`xent::Totals`]), so the block results add up to the
//! one-pass result.

use std::ops::Range;
use std::sync::mpsc::{channel, sync_channel};
use std::time::Instant;

use half::{bf16, f16};
use ndarray::{ArrayView1, ArrayView2};
use xent::{CeOutput, CrossEntropy, DType, Logits, Result, Targets, Tensor2, XentError};

use crate::common::{progress, progress_rate, Engine};
use crate::io::out::TensorOut;
use crate::io::TensorFile;

/// What the rows are scored against.
#[derive(Clone, Copy)]
pub enum BlockTargets<'a> {
    /// Class indices `[N]`.
    Classes(&'a [i64]),
    /// Probability rows `[N, V]` in a file, streamed alongside the logits.
    Probs(&'a TensorFile),
}

/// One cross-entropy over a logits file.
pub struct CeJob<'a> {
    /// The logits file the rows are read from.
    pub logits: &'a TensorFile,
    /// The rows of the file this job scores (all of them, or one rank's share).
    pub span: Range<usize>,
    /// The number of classes V (the file's last dimension).
    pub classes: usize,
    /// The logits' element type in the file.
    pub dtype: DType,
    /// The targets of the job's rows: class indices or probability rows.
    pub targets: BlockTargets<'a>,
    /// The options of the whole batch (`sample_weight` over all N rows; sliced per block).
    pub cfg: &'a CrossEntropy,
    /// Where the gradient goes, if anywhere.
    pub grad: Option<&'a TensorOut>,
    /// Rows per block (the last may be shorter).
    pub block_rows: usize,
}

/// Default bytes of logits per block.
pub const BLOCK_BYTES: usize = 32 << 20;

/// Rows per block: about `BLOCK_BYTES` of logits (at least one row; a multiple of `multiple`).
pub fn block_rows(rows: usize, classes: usize, elem: usize, asked: Option<usize>, multiple: usize) -> Result<usize> {
    if asked == Some(0) {
        return Err(XentError::InvalidOption("--block-rows must be at least 1".into()));
    }
    let per = asked.unwrap_or_else(|| (BLOCK_BYTES / (classes * elem).max(1)).max(1));
    let per = per.min(rows.max(1)).max(1);
    Ok((per.div_ceil(multiple) * multiple).max(multiple))
}

/// Host storage of one block of 16- or 32-bit elements.
enum Raw {
    W32(Vec<f32>),
    W16(Vec<u16>),
}

impl Raw {
    fn new(dtype: DType, len: usize) -> Result<Raw> {
        Ok(match dtype {
            DType::F32 => Raw::W32(xent::alloc::filled(len, 0.0, "logits block")?),
            _ => Raw::W16(xent::alloc::filled(len, 0, "logits block")?),
        })
    }

    fn read(&mut self, file: &TensorFile, start: usize, len: usize) -> Result<()> {
        match self {
            Raw::W32(v) => file.read_into(start, &mut v[..len]),
            Raw::W16(v) => file.read_into(start, &mut v[..len]),
        }
    }

    fn logits(&self, dtype: DType, rows: usize, v: usize) -> Logits<'_> {
        fn view<T>(s: &[T], rows: usize, v: usize) -> ArrayView2<'_, T> {
            ArrayView2::from_shape((rows, v), &s[..rows * v]).expect("block shape")
        }
        match (self, dtype) {
            (Raw::W32(x), _) => Logits::F32(view(x, rows, v)),
            (Raw::W16(x), DType::F16) => Logits::F16(view(bytemuck::cast_slice::<u16, f16>(x), rows, v)),
            (Raw::W16(x), _) => Logits::BF16(view(bytemuck::cast_slice::<u16, bf16>(x), rows, v)),
        }
    }

    #[cfg(feature = "gpu")]
    fn bytes(&self, len: usize) -> &[u8] {
        match self {
            Raw::W32(x) => bytemuck::cast_slice(&x[..len]),
            Raw::W16(x) => bytemuck::cast_slice(&x[..len]),
        }
    }
}

/// A block as read from the files.
struct HostBlock {
    range: Range<usize>,
    logits: Raw,
    probs: Option<Vec<f32>>,
}

/// Rows `r` of a logits file as a typed in-memory tensor.
pub fn read_block(file: &TensorFile, dtype: DType, r: Range<usize>, v: usize) -> Result<Tensor2> {
    let mut t = Tensor2::zeros(dtype, (r.len(), v));
    let start = r.start * v;
    match &mut t {
        Tensor2::F32(a) => file.read_into(start, a.as_slice_mut().expect("fresh"))?,
        Tensor2::F16(a) => file.read_into(start, a.as_slice_mut().expect("fresh"))?,
        Tensor2::BF16(a) => file.read_into(start, a.as_slice_mut().expect("fresh"))?,
    }
    Ok(t)
}

/// Writes an f32/f16/bf16 block to the gradient file.
fn write_tensor(out: &TensorOut, start: usize, t: &Tensor2) -> Result<()> {
    match t {
        Tensor2::F32(a) => out.write(start, a.as_slice().expect("standard layout")),
        Tensor2::F16(a) => out.write(start, a.as_slice().expect("standard layout")),
        Tensor2::BF16(a) => out.write(start, a.as_slice().expect("standard layout")),
    }
}

fn grad_dtype(out: &TensorOut) -> DType {
    match out.dtype {
        crate::io::FileDType::F16 => DType::F16,
        crate::io::FileDType::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

impl CeJob<'_> {
    fn ranges(&self) -> Vec<Range<usize>> {
        let end = self.span.end;
        self.span.clone().step_by(self.block_rows.max(1)).map(|r0| r0..(r0 + self.block_rows).min(end)).collect()
    }

    /// The options of the block of rows `r`: `base` (the job's options without their sample
    /// weights, cloned once per run, not once per block) with the block's sample weights.
    fn block_cfg(&self, base: &CrossEntropy, r: &Range<usize>) -> CrossEntropy {
        base.clone().with_sample_weight(
            self.cfg.data.sample_weight.as_ref().map(|w| w.slice(ndarray::s![r.clone()]).to_owned()),
        )
    }

    /// Runs the job, handing each block's results (in order) to `each`.
    pub fn run(&self, engine: &Engine, each: &mut dyn FnMut(Range<usize>, CeOutput) -> Result<()>) -> Result<()> {
        let v = self.classes;
        let ranges = self.ranges();
        let pb = progress(self.span.len() as u64, (v * self.dtype.size()) as f64);
        let started = Instant::now();
        let per_block = self.block_rows * v;
        // The reader runs one block ahead; buffers come back to it for reuse.
        let (tx, rx) = sync_channel::<Result<HostBlock>>(1);
        let (give_back, take_back) = channel::<HostBlock>();
        let result = std::thread::scope(|s| {
            let reader = s.spawn(move || {
                for r in ranges {
                    let block = take_back.try_recv().map(Ok).unwrap_or_else(|_| {
                        Ok(HostBlock {
                            range: 0..0,
                            logits: Raw::new(self.dtype, per_block)?,
                            probs: match self.targets {
                                BlockTargets::Probs(_) => {
                                    Some(xent::alloc::filled(per_block, 0.0, "probability block")?)
                                }
                                BlockTargets::Classes(_) => None,
                            },
                        })
                    });
                    let block = block.and_then(|mut b| {
                        let len = (r.end - r.start) * v;
                        b.logits.read(self.logits, r.start * v, len)?;
                        if let (BlockTargets::Probs(p), Some(buf)) = (self.targets, b.probs.as_mut()) {
                            p.read_into(r.start * v, &mut buf[..len])?;
                            // Checked here, before either backend sees the block, with the
                            // library's check and the file's rows: the same words on both.
                            let rows = ArrayView2::from_shape((r.len(), v), &buf[..len]).expect("shape");
                            let name = format!("--target-probs {}", p.path.display());
                            xent::check::target_probabilities(rows, r.start, &name)?;
                        }
                        b.range = r;
                        Ok(b)
                    });
                    let failed = block.is_err();
                    if tx.send(block).is_err() || failed {
                        break;
                    }
                }
            });
            let mut done = 0usize;
            let mut step = |b: &HostBlock, out: CeOutput| -> Result<()> {
                done += b.range.len();
                pb.set_position(done as u64);
                progress_rate(&pb, (done * v * self.dtype.size()) as f64, started);
                each(b.range.clone(), out)
            };
            let res = match engine {
                Engine::Cpu(c) => self.run_cpu(c, &rx, &give_back, &mut step),
                #[cfg(feature = "gpu")]
                Engine::Gpu(g) => self.run_gpu(g, &rx, &give_back, &mut step),
            };
            drop(rx);
            reader.join().expect("reader thread");
            res
        });
        pb.finish_and_clear();
        result
    }

    fn targets<'b>(&self, b: &'b HostBlock, all: &'b [i64]) -> Targets<'b> {
        match &b.probs {
            Some(p) => Targets::Probs(
                ArrayView2::from_shape((b.range.len(), self.classes), &p[..b.range.len() * self.classes])
                    .expect("shape"),
            ),
            None => Targets::I64(ArrayView1::from(&all[b.range.clone()])),
        }
    }

    fn run_cpu(
        &self,
        cpu: &xent::Cpu,
        rx: &std::sync::mpsc::Receiver<Result<HostBlock>>,
        give_back: &std::sync::mpsc::Sender<HostBlock>,
        step: &mut dyn FnMut(&HostBlock, CeOutput) -> Result<()>,
    ) -> Result<()> {
        let v = self.classes;
        let classes: &[i64] = match self.targets {
            BlockTargets::Classes(t) => t,
            BlockTargets::Probs(_) => &[],
        };
        let mut scratch: Option<Tensor2> = None;
        let base = self.cfg.clone().with_sample_weight(None);
        for block in rx.iter() {
            let b = block?;
            let rows = b.range.len();
            let logits = b.logits.logits(self.dtype, rows, v);
            let cfg = self.block_cfg(&base, &b.range);
            let targets = self.targets(&b, classes);
            let out = match self.grad {
                None => cpu.cross_entropy(logits, targets, &cfg)?,
                Some(g) => {
                    let dt = grad_dtype(g);
                    let s = match scratch.take() {
                        Some(s) if s.dim() == (rows, v) => s,
                        _ => Tensor2::zeros(dt, (rows, v)),
                    };
                    let mut s = s;
                    let out = cpu.cross_entropy_into(logits, targets, &cfg, s.view_mut())?;
                    write_tensor(g, b.range.start * v, &s)?;
                    scratch = Some(s);
                    out
                }
            };
            step(&b, out)?;
            let _ = give_back.send(b);
        }
        Ok(())
    }

    #[cfg(feature = "gpu")]
    fn run_gpu(
        &self,
        gpu: &xent::GpuContext,
        rx: &std::sync::mpsc::Receiver<Result<HostBlock>>,
        give_back: &std::sync::mpsc::Sender<HostBlock>,
        step: &mut dyn FnMut(&HostBlock, CeOutput) -> Result<()>,
    ) -> Result<()> {
        use wgpu::BufferUsages as U;
        use xent::{CeInputs, DeviceGrad, DeviceTargets};
        let v = self.classes;
        let br = self.block_rows;
        let elem = self.dtype.size() as u64;
        let gdt = self.grad.map(grad_dtype);
        // The plans take each block's sample weights at the call; ignored rows become
        // DEVICE_IGNORED on the device (targets are checked on the host first).
        let plan_cfg = self.cfg.clone().with_sample_weight(None);
        let classes: &[i64] = match self.targets {
            BlockTargets::Classes(t) => t,
            BlockTargets::Probs(_) => &[],
        };
        let soft = matches!(self.targets, BlockTargets::Probs(_));
        let mut plans: Vec<(usize, xent::CePlan)> = Vec::new();
        struct Set {
            logits: wgpu::Buffer,
            targets: wgpu::Buffer,
            sw: Option<wgpu::Buffer>,
            grad: Option<(wgpu::Buffer, wgpu::Buffer)>,
        }
        let nv = (br * v) as u64;
        let set = || -> Result<Set> {
            Ok(Set {
                logits: gpu.create_buffer(nv * elem, U::STORAGE | U::COPY_DST, "logits block")?,
                targets: gpu.create_buffer(
                    if soft { nv * 4 } else { br as u64 * 4 },
                    U::STORAGE | U::COPY_DST,
                    "targets block",
                )?,
                sw: match self.cfg.data.sample_weight {
                    Some(_) => Some(gpu.create_buffer(br as u64 * 4, U::STORAGE | U::COPY_DST, "sample weights")?),
                    None => None,
                },
                grad: match gdt {
                    Some(d) => Some((
                        gpu.create_buffer(nv * d.size() as u64, U::STORAGE | U::COPY_SRC, "gradient block")?,
                        gpu.create_buffer(nv * d.size() as u64, U::MAP_READ | U::COPY_DST, "gradient staging")?,
                    )),
                    None => None,
                },
            })
        };
        let sets = [set()?, set()?];
        // The block in flight: its host buffers, parity, pending loss.
        let mut in_flight: Option<(HostBlock, usize, xent::PendingCe)> = None;
        let mut finish = |(b, k, pending): (HostBlock, usize, xent::PendingCe)| -> Result<()> {
            let out = pending.wait()?;
            if let (Some(g), Some((_, staging)), Some(d)) = (self.grad, &sets[k].grad, gdt) {
                let len = b.range.len() * v;
                let mut t = Tensor2::zeros(d, (b.range.len(), v));
                let bytes = t.view_mut().bytes_mut().expect("fresh").len();
                gpu.read_staging(staging, &mut t.view_mut().bytes_mut().expect("fresh")[..bytes])?;
                debug_assert_eq!(bytes, len * d.size());
                write_tensor(g, b.range.start * v, &t)?;
            }
            step(&b, out)?;
            let _ = give_back.send(b);
            Ok(())
        };
        for (i, block) in rx.iter().enumerate() {
            let b = block?;
            let k = i % 2;
            let rows = b.range.len();
            if !plans.iter().any(|(r, _)| *r == rows) {
                plans.push((rows, gpu.cross_entropy_plan_device_classes(rows, v, self.dtype, &plan_cfg)?));
            }
            let plan = &plans.iter().find(|(r, _)| *r == rows).expect("plan").1;
            let s = &sets[k];
            gpu.write_buffer(&s.logits, 0, b.logits.bytes(rows * v))?;
            match &b.probs {
                Some(p) => gpu.write_buffer(&s.targets, 0, bytemuck::cast_slice(&p[..rows * v]))?,
                None => {
                    let t = Targets::I64(ArrayView1::from(&classes[b.range.clone()]))
                        .device_classes(v, self.cfg.ignore_index)?;
                    gpu.write_buffer(&s.targets, 0, bytemuck::cast_slice(&t))?;
                }
            }
            if let (Some(w), Some(buf)) = (&self.cfg.data.sample_weight, &s.sw) {
                let w: Vec<f32> = w.slice(ndarray::s![b.range.clone()]).to_vec();
                gpu.write_buffer(buf, 0, bytemuck::cast_slice(&w))?;
            }
            let n = rows as u64;
            let inputs = CeInputs {
                logits: crate::common::head(&s.logits, n * v as u64 * elem),
                targets: if soft {
                    DeviceTargets::Probs(crate::common::head(&s.targets, n * v as u64 * 4))
                } else {
                    DeviceTargets::Classes(crate::common::head(&s.targets, n * 4))
                },
                sample_weight: s.sw.as_ref().map(|w| crate::common::head(w, n * 4)),
                grad: match (&s.grad, gdt) {
                    (Some((g, _)), Some(d)) => {
                        DeviceGrad::Separate(crate::common::head(g, n * v as u64 * d.size() as u64), d)
                    }
                    _ => DeviceGrad::None,
                },
            };
            let mut enc = gpu.device().create_command_encoder(&Default::default());
            plan.record(&mut enc, inputs)?;
            let pending = plan.read_back(&mut enc, true)?;
            if let (Some((g, staging)), Some(d)) = (&s.grad, gdt) {
                let bytes = (n * v as u64 * d.size() as u64).next_multiple_of(4);
                enc.copy_buffer_to_buffer(g, 0, staging, 0, bytes);
            }
            gpu.submit_encoder(enc)?;
            // While this block runs, finish the previous one (its copies are done by now or soon).
            if let Some(prev) = in_flight.take() {
                finish(prev)?;
            }
            in_flight = Some((b, k, pending));
        }
        if let Some(prev) = in_flight.take() {
            finish(prev)?;
        }
        Ok(())
    }
}
