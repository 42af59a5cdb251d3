//! Flex gradients are written into pooled buffers that return when Burn drops the tensor. A
//! test binary of its own: the pool is global to the process.

use burn::prelude::*;
use xent::cpu::reference;
use xent::{CrossEntropy, Reduction};

#[test]
fn flex_gradient_buffers_return_to_the_pool_and_are_rewritten_in_full() {
    let (n, v) = (37usize, 1009usize);
    let bytes = (n * v * 4).div_ceil(16) * 16;
    let device = Device::flex().autodiff();
    let cfg = CrossEntropy::default().with_reduction(Reduction::Sum);
    // Loss and gradient, with the bytes pooled while the gradient is alive.
    let run = |x: &ndarray::Array2<f32>, t: &[i64]| {
        let logits = Tensor::<2>::from_data(TensorData::new(x.iter().copied().collect::<Vec<f32>>(), [n, v]), &device)
            .require_grad();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(t.to_vec(), [n]), &device);
        let loss = xent_burn::cross_entropy(logits.clone(), targets, &cfg).unwrap();
        let grads = loss.backward();
        let g = logits.grad(&grads).unwrap();
        let pooled_meanwhile = xent_burn::pooled_bytes();
        (g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), pooled_meanwhile)
    };
    xent_burn::release_pooled_buffers();
    let (x1, t1) = xent::workload::synthetic(n, v, 3.0, 0, 5);
    let (g1, _) = run(&x1, t1.as_slice().unwrap());
    assert_eq!(xent_burn::pooled_bytes(), bytes, "the dropped gradient's buffer is pooled");

    // Other logits with every third row ignored, into the pooled buffer that still holds g1:
    // every element must be rewritten, the ignored rows with zeros.
    let (x2, t2) = xent::workload::synthetic(n, v, 3.0, 3, 6);
    let (g2, pooled_meanwhile) = run(&x2, t2.as_slice().unwrap());
    assert_eq!(pooled_meanwhile, 0, "the second call took the pooled buffer");
    let r = reference::cross_entropy(&x2, &t2, &cfg).unwrap();
    let worst = g2.iter().zip(r.grad.iter()).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
    assert!(worst < 1e-6, "gradient off by {worst}");
    for i in (0..n).filter(|&i| t2[i] == -100) {
        assert!(g1[i * v..(i + 1) * v].iter().any(|&g| g != 0.0), "row {i} held the old gradient");
        assert!(g2[i * v..(i + 1) * v].iter().all(|&g| g == 0.0), "ignored row {i} is zero");
    }
    assert_eq!(xent_burn::pooled_bytes(), bytes);
    xent_burn::release_pooled_buffers();
    assert_eq!(xent_burn::pooled_bytes(), 0);
}
