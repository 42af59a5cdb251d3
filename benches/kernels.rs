//! Criterion benchmarks of the kernels on both backends, small and large shapes.
//!
//! `cargo bench --bench kernels` (GPU cases are skipped when there is no adapter).
//! GPU timings are device-resident: logits uploaded once, gradient left on the GPU.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wgpu::util::DeviceExt;
use xent::{
    workload, CeInputs, Cpu, CrossEntropy, DType, DeviceGrad, DeviceTargets, GpuContext, LinearCe, LinearLogprobs,
    SoftmaxKind,
};

const SHAPES: &[(usize, usize)] = &[(256, 4096), (1024, 32000), (4096, 32000)];

fn cross_entropy(c: &mut Criterion) {
    let cpu = Cpu::new();
    let gpu = GpuContext::new().ok();
    if gpu.is_none() {
        eprintln!("no GPU adapter: GPU benchmarks skipped");
    }
    let mut group = c.benchmark_group("cross_entropy_fwd_bwd");
    group.sample_size(10);
    for &(n, v) in SHAPES {
        let (x, t) = workload::synthetic(n, v, 2.0, 16, 1);
        group.throughput(Throughput::Bytes((2 * n * v * 4) as u64));
        let cfg = CrossEntropy::default();
        let mut grad = ndarray::Array2::<f32>::zeros((n, v));
        group.bench_with_input(BenchmarkId::new("cpu", format!("{n}x{v}")), &(), |b, _| {
            b.iter(|| cpu.cross_entropy_into(&x, &t, &cfg, &mut grad).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("cpu-fwd", format!("{n}x{v}")), &(), |b, _| {
            b.iter(|| cpu.cross_entropy(&x, &t, &cfg).unwrap())
        });
        if let Some(g) = &gpu {
            let d = g.device();
            let usage = wgpu::BufferUsages::STORAGE;
            let lb = d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(x.as_slice().unwrap()),
                usage,
            });
            let ti: Vec<i32> = t.iter().map(|&y| y as i32).collect();
            let tb = d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&ti),
                usage,
            });
            let gb = d.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: (n * v * 4) as u64,
                usage,
                mapped_at_creation: false,
            });
            let plan = g.cross_entropy_plan(n, v, DType::F32, &cfg).unwrap();
            let inputs = CeInputs {
                logits: lb.slice(..),
                targets: DeviceTargets::Classes(tb.slice(..)),
                sample_weight: None,
                grad: DeviceGrad::Separate(gb.slice(..), DType::F32),
            };
            group.bench_with_input(BenchmarkId::new("gpu-device", format!("{n}x{v}")), &(), |b, _| {
                b.iter(|| {
                    let mut enc = d.create_command_encoder(&Default::default());
                    plan.record(&mut enc, inputs).unwrap();
                    let p = plan.read_back(&mut enc, false).unwrap();
                    g.queue().submit([enc.finish()]);
                    p.wait().unwrap()
                })
            });
        }
    }
    group.finish();
}

fn log_softmax(c: &mut Criterion) {
    let cpu = Cpu::new();
    let gpu = GpuContext::new().ok();
    let mut group = c.benchmark_group("log_softmax");
    group.sample_size(10);
    let (n, v) = (256, 32000);
    let (x, _) = workload::synthetic(n, v, 2.0, 0, 1);
    group.throughput(Throughput::Bytes((2 * n * v * 4) as u64));
    group.bench_function("cpu/256x32000", |b| b.iter(|| cpu.log_softmax(&x, SoftmaxKind::LogSoftmax).unwrap()));
    if let Some(g) = &gpu {
        group.bench_function("gpu-host/256x32000", |b| b.iter(|| g.log_softmax(&x, SoftmaxKind::LogSoftmax).unwrap()));
    }
    group.finish();
}

/// Linear log-probs and entropies beside the fused linear cross-entropy on the same arrays
/// (forward and every gradient): the same three products, a different row pass.
fn linear_logprobs(c: &mut Criterion) {
    let cpu = Cpu::new();
    let gpu = GpuContext::new().ok();
    let mut group = c.benchmark_group("linear_fwd_bwd");
    group.sample_size(10);
    for (dev, (n, d, v)) in [("cpu", (1024, 512, 32000)), ("gpu", (256, 256, 32000))] {
        let h = workload::synthetic(n, d, 1.0, 0, 1).0;
        let w = workload::synthetic(v, d, 0.05, 0, 2).0;
        let t: Vec<i64> = (0..n).map(|i| ((i * 7919) % v) as i64).collect();
        let (a, b) = (ndarray::Array1::<f32>::ones(n), ndarray::Array1::from_elem(n, 0.01f32));
        let up = Some((a.view(), b.view()));
        let (ce, lp) = (LinearCe::default(), LinearLogprobs::default());
        let id = |what: &str| BenchmarkId::new(format!("{dev}-{what}"), format!("{n}x{d}x{v}"));
        match (dev, &gpu) {
            ("cpu", _) => {
                group.bench_function(id("linear_ce"), |bn| {
                    bn.iter(|| cpu.linear_cross_entropy(&h, &w, None, &t[..], &ce).unwrap())
                });
                group.bench_function(id("logprobs"), |bn| {
                    bn.iter(|| cpu.linear_logprobs(&h, &w, None, &t[..], &lp, up).unwrap())
                });
            }
            (_, Some(g)) => {
                group.bench_function(id("linear_ce"), |bn| {
                    bn.iter(|| g.linear_cross_entropy(&h, &w, None, &t[..], &ce).unwrap())
                });
                group.bench_function(id("logprobs"), |bn| {
                    bn.iter(|| g.linear_logprobs(&h, &w, None, &t[..], &lp, up).unwrap())
                });
            }
            _ => {}
        }
    }
    group.finish();
}

criterion_group!(benches, cross_entropy, log_softmax, linear_logprobs);
criterion_main!(benches);
