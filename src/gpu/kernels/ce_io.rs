//! Cross-entropy's family interface, mirrored by `shaders/ce_io.wgsl` and checked against it by
//! naga: its compile-time switches ([`CeSwitches`]), flag bits ([`flags`]), parameter block
//! ([`CeParams`]) and the scalars its passes leave on the device ([`Scalars`]); its three
//! kernels' bindings by slot and name and their variants are `cross_entropy.rs`'s `FAMILY`.
//! Used by the kernels of `cross_entropy.rs` and `vocab.rs`, and by distillation's reduce pass.
//! An option of the family is added here, in `cross_entropy.rs` (where it is set, and its
//! variants), and in the family's WGSL.

use crate::gpu::params::{flag_bits, mirror, Block, Header};

/// Compile-time switches of the cross-entropy family (its part of a kernel [`Variant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CeSwitches {
    /// Per-element extras of the softmax pass: label smoothing or class-weighted sums,
    /// probability targets, target ranks. Off, the pass is max/sum only.
    pub extras: bool,
    /// Which pass of a row split into segments.
    pub seg: Seg,
    /// Per-element temperature / soft-capping code: off, the logits are used as they are (a
    /// software rasteriser runs uniform branches masked, paying for both sides).
    pub transform: bool,
    /// Per-element class-weight reads.
    pub class_w: bool,
}

/// The passes of a cross-entropy whose rows are split across workgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Seg {
    /// One workgroup per row.
    #[default]
    Whole,
    /// Partial statistics per segment.
    Stat,
    /// Merged statistics, the row's loss, and each segment's gradient.
    Finish,
}

impl CeSwitches {
    /// The value of a preprocessor name this family owns (`EXTRAS`, `SEG_STAT`, `SEG_FINISH`,
    /// `TRANSFORM`, `CLASS_W`); `None` for any other name.
    pub(crate) fn defined(&self, name: &str) -> Option<bool> {
        Some(match name {
            "EXTRAS" => self.extras,
            "SEG_STAT" => self.seg == Seg::Stat,
            "SEG_FINISH" => self.seg == Seg::Finish,
            "TRANSFORM" => self.transform,
            "CLASS_W" => self.class_w,
            _ => return None,
        })
    }
}

/// The family's WGSL interface (`shaders/ce_io.wgsl`: flags, [`CeParams`], the helpers that
/// read them), put between the row kernels' shared code and each kernel's own file.
pub(crate) const WGSL: &str = include_str!("../../../shaders/ce_io.wgsl");

flag_bits! {
    /// Cross-entropy's flag bits (`F_*` in `shaders/ce_io.wgsl`), in its header's `flags`.
    pub(crate) mod flags("F_") {
        CLASS_W = 1,
        SAMPLE_W = 2,
        SOFTCAP = 4,
        TEMP = 8,
        SMOOTH = 16,
        MEAN = 32,
        ZLOSS = 128,
        SOFT = 256,
        RANK = 8192,
        GAP = 16384,
        EXT_DENOM = 65536,
        UPSTREAM = 131072,
        UP_ROWS = 262144,
        SAVE = 524288,
        FROM_SAVED = 1048576,
        SHARD = 2097152,
    }
}

mirror! {
    /// Cross-entropy's parameters; mirrors `CeParams` in `shaders/ce_io.wgsl`.
    pub(crate) struct CeParams {
        pub head: Header,
        pub ignore_index: i32,
        pub smoothing: f32,
        pub z_loss: f32,
        pub softcap: f32,
        pub inv_temp: f32,
        pub grad_scale: f32,
        pub v_total: u32,
        pub class0: u32,
        pub segs: u32,
        pub seg_len: u32,
        pub den_w: f32,
        pub den_n: f32,
        pub parts: u32,
    }
}

impl Block for CeParams {
    fn head(&self) -> &Header {
        &self.head
    }
}

mirror! {
    /// Scalars a cross-entropy pass leaves on the device; mirrors `Scalars` in `ce_io.wgsl`.
    pub(crate) struct Scalars {
        pub weight_sum: f32,
        pub count: u32,
        pub loss_sum: f32,
        pub lse2_sum: f32,
        pub err_row: u32,
        pub err_target: i32,
        pub loss: f32,
        pub upstream: f32,
    }
}

/// Bytes of [`Scalars`].
pub(crate) const SCALARS: u64 = std::mem::size_of::<Scalars>() as u64;

impl Scalars {
    /// The state a pass starts from: no target error seen.
    pub fn initial() -> Scalars {
        Scalars { err_row: u32::MAX, ..bytemuck::Zeroable::zeroed() }
    }
}

impl CeParams {
    /// Parameters over `n` rows of `v`: no flags, no transform, unit scale, whole rows.
    pub fn new(n: usize, v: usize) -> CeParams {
        CeParams {
            head: Header::new(n, v),
            ignore_index: 0,
            smoothing: 0.0,
            z_loss: 0.0,
            softcap: 1.0,
            inv_temp: 1.0,
            grad_scale: 1.0,
            v_total: v as u32,
            class0: 0,
            segs: 1,
            seg_len: v as u32,
            den_w: 0.0,
            den_n: 0.0,
            parts: 1,
        }
    }

    /// These parameters with the flag bits `f`.
    pub fn with_flags(mut self, f: u32) -> CeParams {
        self.head.flags = f;
        self
    }
}
