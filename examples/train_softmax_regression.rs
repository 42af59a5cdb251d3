//! Softmax regression trained on the GPU: logits and gradients never leave the device.
//!
//! Each step is one submission: logits = X W (our own matmul kernel on xent's device), xent's
//! fused cross-entropy recorded into the same encoder writes d(loss)/d(logits) over the
//! logits buffer in place, then dW = X^T G and W -= lr dW. The loss is read back every 10
//! steps, without stalling the other steps. For comparison the example also times the same
//! training with a blocking loss read after every step (what xent's API forced before plans).
//!
//! Run: `cargo run --release --example train_softmax_regression`

use std::time::Instant;

use wgpu::util::DeviceExt;
use xent::{CeInputs, CrossEntropy, DType, DeviceGrad, DeviceTargets, GpuContext};

const N: usize = 2048; // samples
const D: usize = 32; // features
const C: usize = 10; // classes

const KERNELS: &str = r#"
struct Dims { n: u32, d: u32, c: u32, lr: f32 }
@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // [n, d]
@group(0) @binding(2) var<storage, read_write> w: array<f32>;  // [d, c]
@group(0) @binding(3) var<storage, read_write> z: array<f32>;  // [n, c]: logits, then gradient

// z = x w
@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= dims.n * dims.c) { return; }
    let r = i / dims.c;
    let k = i % dims.c;
    var acc = 0.0;
    for (var j = 0u; j < dims.d; j++) { acc += x[r * dims.d + j] * w[j * dims.c + k]; }
    z[i] = acc;
}

// w -= lr * x^T z   (z holds the gradient of the mean loss w.r.t. the logits)
@compute @workgroup_size(64)
fn update(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= dims.d * dims.c) { return; }
    let j = i / dims.c;
    let k = i % dims.c;
    var acc = 0.0;
    for (var r = 0u; r < dims.n; r++) { acc += x[r * dims.d + j] * z[r * dims.c + k]; }
    w[i] -= dims.lr * acc;
}
"#;

fn main() {
    let ctx = match GpuContext::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return;
        }
    };
    println!("device: {}", ctx.adapter_name());
    let dev = ctx.device();

    // A separable problem: labels come from a hidden linear model.
    let (x, _) = xent::workload::synthetic(N, D, 1.0, 0, 1);
    let (w_true, _) = xent::workload::synthetic(D, C, 1.0, 0, 2);
    let scores = x.dot(&w_true);
    let labels: Vec<i32> = scores
        .rows()
        .into_iter()
        .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as i32)
        .collect();

    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let init = |label, contents: &[u8], usage| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents, usage })
    };
    let xb = init("x", bytemuck::cast_slice(x.as_slice().unwrap()), storage);
    let wb = init("w", &vec![0u8; D * C * 4], storage);
    let zb = init("logits", &vec![0u8; N * C * 4], storage);
    let tb = init("targets", bytemuck::cast_slice(&labels), storage);
    let dims: [u32; 4] = [N as u32, D as u32, C as u32, 0.5f32.to_bits()];
    let ub = init("dims", bytemuck::cast_slice(&dims), wgpu::BufferUsages::UNIFORM);

    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("softmax regression"),
        source: wgpu::ShaderSource::Wgsl(KERNELS.into()),
    });
    let pipeline = |entry| {
        dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    };
    let (forward, update) = (pipeline("forward"), pipeline("update"));
    let group = |p: &wgpu::ComputePipeline| {
        let entries: Vec<_> = [&ub, &xb, &wb, &zb]
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .collect();
        dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.get_bind_group_layout(0),
            entries: &entries,
        })
    };
    let (gf, gu) = (group(&forward), group(&update));
    let pass = |enc: &mut wgpu::CommandEncoder, p: &wgpu::ComputePipeline, g: &wgpu::BindGroup, threads: usize| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(p);
        pass.set_bind_group(0, g, &[]);
        pass.dispatch_workgroups(threads.div_ceil(64) as u32, 1, 1);
    };

    // Gradient of the mean loss, written over the logits buffer.
    let plan = ctx.cross_entropy_plan(N, C, DType::F32, &CrossEntropy::default()).expect("plan");
    let inputs = CeInputs {
        logits: zb.slice(..),
        targets: DeviceTargets::Classes(tb.slice(..)),
        sample_weight: None,
        grad: DeviceGrad::InPlace,
    };
    // `every`: read the loss back every this many steps (1: a blocking read after each step).
    let train = |steps: usize, every: usize, log: bool| {
        dev.queue_reset(&ctx, &wb);
        let (mut first, mut last) = (None, 0.0);
        let t0 = Instant::now();
        for step in 0..steps {
            let mut enc = dev.create_command_encoder(&Default::default());
            pass(&mut enc, &forward, &gf, N * C);
            plan.record(&mut enc, inputs).expect("cross-entropy");
            let pending =
                (step % every == 0 || step + 1 == steps).then(|| plan.read_back(&mut enc, false).expect("read"));
            pass(&mut enc, &update, &gu, D * C);
            ctx.queue().submit([enc.finish()]);
            if let Some(p) = pending {
                let loss = p.wait().expect("loss").loss;
                first.get_or_insert(loss);
                last = loss;
                if log && step % 25 == 0 {
                    println!("step {step:3}: loss {loss:.4}");
                }
            }
        }
        ctx.device().poll(wgpu::PollType::wait_indefinitely()).expect("poll");
        (first.unwrap(), last, steps as f64 / t0.elapsed().as_secs_f64())
    };
    let (start, last, rate) = train(151, 10, true);
    let (_, _, rate_sync) = train(151, 1, false);
    println!("loss {start:.4} -> {last:.4} (ln {C} = {:.4})", (C as f64).ln());
    println!("{rate:.0} steps/s recorded (one submission per step, loss read every 10 steps)");
    println!("{rate_sync:.0} steps/s with a blocking loss read after every step");
    assert!(last < 0.5 * start, "training should at least halve the loss");
}

/// Resets the weights to zero between the two timed runs.
trait Reset {
    fn queue_reset(&self, ctx: &GpuContext, w: &wgpu::Buffer);
}
impl Reset for wgpu::Device {
    fn queue_reset(&self, ctx: &GpuContext, w: &wgpu::Buffer) {
        let mut enc = self.create_command_encoder(&Default::default());
        enc.clear_buffer(w, 0, None);
        ctx.queue().submit([enc.finish()]);
    }
}
