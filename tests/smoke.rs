mod common;
use common::*;
use xent::*;

#[test]
fn smoke() {
    let mut rng = Rng(1);
    for (name, g) in gpus() {
        for &(n, v) in &[(3usize, 1usize), (7, 5), (5, 64), (9, 1001), (40, 3000)] {
            let x = rng.logits(n, v, 3.0);
            let t = rng.targets(n, v, 3);
            let cfg = CrossEntropy { grad: GradMode::Separate, per_row: true, ..Default::default() };
            let r = cpu::reference::cross_entropy(x.view(), t.view().into(), &cfg).unwrap();
            let o = g.cross_entropy(x.view(), t.view().into(), &cfg).unwrap();
            println!("{name} {n}x{v} loss {} vs {}", o.loss, r.loss);
            assert_scalar("loss", o.loss, r.loss, 1e-5, 1e-5);
            assert_close_2d("grad", o.grad.as_ref().unwrap().view(), r.grad.view(), 1e-6, 1e-4);
        }
    }
}
