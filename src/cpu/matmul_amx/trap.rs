//! Trap and emulate (unit tests, Linux): the AMX instructions of [`Native`] on a CPU without
//! them.
//!
//! There each tile instruction raises #UD, which Linux delivers as `SIGILL`. This module's
//! handler then does three things:
//! - it decodes the faulting instruction from its bytes (VEX prefix, ModRM, SIB and
//!   displacement, as the assembler encoded them), reading the general registers it names from
//!   the signal's saved context;
//! - it runs the instruction on this thread's tile state, following the SDM's pseudo-code
//!   (`ldtilecfg` and its checks, rows and `colsb`, zeroed upper rows and bytes,
//!   `tdpbf16ps`'s shape checks);
//! - it resumes after the instruction.
//!
//! So the `asm!` of [`Native`] runs here, and with it the driver over it: its encodings, which
//! register holds the address and which the stride, which tile each instruction names, and the
//! configuration it loads. [`super::Model`] checks none of these. The decoder is checked
//! against GNU `as`'s encodings (a second assembler beside rustc's LLVM).
//!
//! The SDM leaves the order of the f32 sums inside one `tdpbf16ps` to the hardware, so the
//! emulator sums in the pseudo-code's order, or in one of two others that
//! `XENT_TEST_AMX_SUM` picks: the tests must pass in each.
//!
//! What emulation cannot show: the hardware's own order and rounding, its speed, and Linux's
//! grant of the tile data. Those wait for an AMX CPU.
//!
//! Anything the handler does not decode, or a use the hardware would fault on (tiles not
//! configured, shapes that do not fit), writes one line to stderr and restores the default
//! action. The instruction then faults again and the process dies, as it would on the
//! hardware.
//!
//! Why hand-written: Intel's SDE, which runs AMX code in user space, is proprietary and not in
//! this workplace's registries; Bochs emulates a whole machine, and a Linux on it did not boot
//! (`docs/cpu-bf16-matmul.md`). This is a test fixture that runs inside `cargo test` on any
//! x86-64 Linux.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::{sdm_flush, sdm_pair, sdm_products};

/// Tile registers of palette 1.
const TILES: usize = 8;

/// One thread's tile state: the configuration (`palette` 0: none) and eight tiles of up to 16
/// rows of 64 bytes.
#[derive(Clone, Copy)]
struct State {
    palette: u8,
    rows: [u8; TILES],
    colsb: [u16; TILES],
    t: [[[u8; 64]; 16]; TILES],
}

/// The init state: tiles not configured (after `tilerelease`, or before any `ldtilecfg`).
const INIT: State = State { palette: 0, rows: [0; TILES], colsb: [0; TILES], t: [[[0; 64]; 16]; TILES] };

thread_local! {
    // A const initializer and no destructor: plain thread-local storage, safe to reach from a
    // signal handler (no lazy initialization, no allocation).
    static STATE: UnsafeCell<State> = const { UnsafeCell::new(INIT) };
    /// Tile instructions emulated on this thread.
    static HERE: Cell<u64> = const { Cell::new(0) };
}

/// Tile instructions emulated so far, in every thread.
static EMULATED: AtomicU64 = AtomicU64::new(0);

/// The instructions the handler runs, with their operands resolved: addresses and strides
/// from the registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    LdTileCfg(usize),
    StTileCfg(usize),
    Release,
    Zero(usize),
    /// `tileloadd` and `tileloaddt1` (a cache hint, same result).
    Load {
        t: usize,
        addr: usize,
        stride: usize,
    },
    Store {
        t: usize,
        addr: usize,
        stride: usize,
    },
    /// `tdpbf16ps c, a, b`.
    Dp {
        c: usize,
        a: usize,
        b: usize,
    },
}

/// Whether the handler is installed: `Some(true)` where cpuid reports no AMX tiles,
/// `Some(false)` where it does and the instructions run themselves.
static ON: OnceLock<bool> = OnceLock::new();

/// Emulation where the CPU lacks AMX: installs the handler (once per process) and returns
/// `true`; `false` where cpuid reports the tiles, whose instructions then run themselves.
pub(crate) fn install() -> bool {
    *ON.get_or_init(|| {
        if super::cpu_lacks().is_none() {
            return false;
        }
        // Chosen here, not in the handler, which must not allocate.
        ORDER.get_or_init(|| match std::env::var("XENT_TEST_AMX_SUM").as_deref() {
            Err(_) | Ok("sdm") => SumOrder::Sdm,
            Ok("reversed") => SumOrder::Reversed,
            Ok("fused") => SumOrder::Fused,
            Ok(other) => panic!("XENT_TEST_AMX_SUM={other}: sdm, reversed or fused"),
        });
        // SAFETY: a zeroed sigaction is valid; the handler is an `extern "C"` function of the
        // SA_SIGINFO form.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigill as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGILL, &sa, std::ptr::null_mut()), 0, "sigaction");
        }
        true
    })
}

/// The order of the sums inside one `tdpbf16ps`, which the SDM leaves to the hardware ("f32
/// sums"). `XENT_TEST_AMX_SUM` picks it when the handler is installed; only
/// `emulated_with_other_summation_orders` sets it, in child processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SumOrder {
    /// The pseudo-code's: pairs in order, each pair's low product, then its high one.
    Sdm,
    /// Pairs last to first, each pair's high product first.
    Reversed,
    /// Pairs in order, each pair's two products added to the sum with one rounding.
    Fused,
}

static ORDER: OnceLock<SumOrder> = OnceLock::new();

/// The order [`install`] chose (the pseudo-code's before it).
fn order() -> SumOrder {
    ORDER.get().copied().unwrap_or(SumOrder::Sdm)
}

/// The summation order the emulator uses: "sdm", "reversed" or "fused".
pub(crate) fn sum_order() -> &'static str {
    match order() {
        SumOrder::Sdm => "sdm",
        SumOrder::Reversed => "reversed",
        SumOrder::Fused => "fused",
    }
}

/// Whether [`install`] installed the handler.
pub(crate) fn active() -> bool {
    ON.get() == Some(&true)
}

/// Tile instructions emulated so far, in every thread.
pub(crate) fn emulated() -> u64 {
    EMULATED.load(Ordering::Relaxed)
}

/// Tile instructions emulated so far on this thread.
pub(crate) fn emulated_here() -> u64 {
    HERE.with(Cell::get)
}

/// The general registers in their encoding order (`rax` = 0 .. `r15` = 15) as the saved
/// context indexes them.
const GPR: [libc::c_int; 16] = [
    libc::REG_RAX,
    libc::REG_RCX,
    libc::REG_RDX,
    libc::REG_RBX,
    libc::REG_RSP,
    libc::REG_RBP,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
];

extern "C" fn on_sigill(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: Linux passes the interrupted thread's context; the faulting instruction's bytes
    // are mapped code; the tile state is this thread's.
    unsafe {
        let g = &mut (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        let rip = g[libc::REG_RIP as usize] as usize;
        let regs: [u64; 16] = std::array::from_fn(|i| g[GPR[i] as usize] as u64);
        let done = decode(|i| *((rip + i) as *const u8), &regs, rip)
            .and_then(|(op, len)| STATE.with(|s| run(&mut *s.get(), op)).map(|()| len));
        match done {
            Ok(len) => {
                g[libc::REG_RIP as usize] += len as i64;
                EMULATED.fetch_add(1, Ordering::Relaxed);
                HERE.with(|h| h.set(h.get() + 1));
            }
            Err(why) => give_up(why),
        }
    }
}

/// Says why on stderr (async-signal-safe `write`) and restores the default action, so that
/// the instruction faults again and ends the process.
fn give_up(why: &str) {
    for part in ["xent AMX emulator: ", why, "; the instruction faults, as on the hardware\n"] {
        // SAFETY: writes the bytes of a live string to stderr.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGILL, libc::SIG_DFL) };
}

/// The instruction whose byte `i` is `code(i)`, at `rip`, with the general registers `regs`:
/// the operation and the instruction's length, or why it is not one of the AMX instructions
/// emulated here.
fn decode(code: impl Fn(usize) -> u8, regs: &[u64; 16], rip: usize) -> Result<(Op, usize), &'static str> {
    // Three-byte VEX: C4, then !R !X !B and the opcode map, then W, !vvvv, L and pp.
    if code(0) != 0xc4 {
        return Err("not a three-byte VEX instruction");
    }
    let (b1, b2) = (code(1), code(2));
    let (r, x, b) = (b1 >> 7 & 1 ^ 1, b1 >> 6 & 1 ^ 1, b1 >> 5 & 1 ^ 1);
    let (map, w, vvvv, l, pp) = (b1 & 0x1f, b2 >> 7, !b2 >> 3 & 0xf, b2 >> 2 & 1, b2 & 3);
    if map != 2 || w != 0 || l != 0 {
        return Err("not in the AMX opcode space (VEX.128.0F38.W0)");
    }
    let (opcode, modrm) = (code(3), code(4));
    let (md, reg, rm) = (modrm >> 6, modrm >> 3 & 7, modrm & 7);
    // Tile operands are tmm0..7: no R extension on ModRM.reg, nor B on a tile in ModRM.rm.
    let tile_reg = || if r == 0 { Ok(reg as usize) } else { Err("a tile register above tmm7") };
    let no_vvvv = || if vvvv == 0 { Ok(()) } else { Err("VEX.vvvv must be 1111b") };
    // A memory operand from ModRM: its address, the stride (index << scale, 0 without an
    // index), whether it had a SIB byte, and the instruction's length.
    let mem = || -> Result<(usize, usize, bool, usize), &'static str> {
        if md == 3 {
            return Err("a register where memory was expected");
        }
        let sib = rm == 4;
        // `base` None: RIP-relative. mod 00 with base 101 means no base register and a 32-bit
        // displacement: with a SIB, from 0 (`base` Some(0)); without, from the next instruction.
        let (mut at, mut base, mut stride) = (5, Some(0usize), 0usize);
        let mut disp32_alone = false;
        if sib {
            let s = code(5);
            at = 6;
            let (scale, index, base_r) = (s >> 6, (s >> 3 & 7) | x << 3, s & 7);
            if index != 4 {
                stride = (regs[index as usize] as usize) << scale;
            }
            if base_r == 5 && md == 0 {
                disp32_alone = true;
            } else {
                base = Some(regs[(base_r | b << 3) as usize] as usize);
            }
        } else if rm == 5 && md == 0 {
            (disp32_alone, base) = (true, None);
        } else {
            base = Some(regs[(rm | b << 3) as usize] as usize);
        }
        let disp_len = match md {
            1 => 1,
            2 => 4,
            _ if disp32_alone => 4,
            _ => 0,
        };
        let disp = match disp_len {
            1 => code(at) as i8 as isize,
            4 => i32::from_le_bytes([code(at), code(at + 1), code(at + 2), code(at + 3)]) as isize,
            _ => 0,
        };
        let len = at + disp_len;
        let start = base.unwrap_or(rip + len);
        Ok((start.wrapping_add_signed(disp), stride, sib, len))
    };
    match (pp, opcode) {
        // NP 49: ldtilecfg m512, or tilerelease (ModRM C0).
        (0, 0x49) if modrm == 0xc0 => no_vvvv().map(|()| (Op::Release, 5)),
        (0 | 1, 0x49) if reg == 0 => {
            no_vvvv()?;
            let (addr, _, _, len) = mem()?;
            Ok((if pp == 0 { Op::LdTileCfg(addr) } else { Op::StTileCfg(addr) }, len))
        }
        // F2 49 /r (register form, rm 0): tilezero.
        (3, 0x49) if md == 3 && rm == 0 => {
            no_vvvv()?;
            Ok((Op::Zero(tile_reg()?), 5))
        }
        // F2 4B: tileloadd; 66 4B: tileloaddt1; F3 4B: tilestored. SIB required.
        (1..=3, 0x4b) => {
            no_vvvv()?;
            let t = tile_reg()?;
            let (addr, stride, sib, len) = mem()?;
            if !sib {
                return Err("a tile load or store without a SIB byte");
            }
            Ok((if pp == 2 { Op::Store { t, addr, stride } } else { Op::Load { t, addr, stride } }, len))
        }
        // F3 5C /r: tdpbf16ps tmm(reg), tmm(rm), tmm(vvvv).
        (2, 0x5c) if md == 3 => {
            if b != 0 || vvvv > 7 {
                return Err("a tile register above tmm7");
            }
            Ok((Op::Dp { c: tile_reg()?, a: rm as usize, b: vvvv as usize }, 5))
        }
        _ => Err("an AMX opcode this emulator does not run (only the six xent uses and sttilecfg)"),
    }
}

/// One element of `tdpbf16ps`, summed in `order`: `acc` plus the products of the `k` pairs of
/// bf16 in the words `x(q)` (of a row of `A`) and `y(q)` (of a column of `B`).
fn dot(order: SumOrder, mut acc: f32, k: usize, x: impl Fn(usize) -> u32, y: impl Fn(usize) -> u32) -> f32 {
    match order {
        SumOrder::Sdm => (0..k).for_each(|q| acc = sdm_pair(acc, x(q), y(q))),
        SumOrder::Reversed => (0..k).rev().for_each(|q| {
            let (lo, hi) = sdm_products(x(q), y(q));
            acc = acc + hi + lo;
        }),
        SumOrder::Fused => (0..k).for_each(|q| {
            let (lo, hi) = sdm_products(x(q), y(q));
            acc = (acc as f64 + lo as f64 + hi as f64) as f32;
        }),
    }
    acc
}

/// Runs `op` on the tile state `s`, as the SDM's pseudo-code does, or says why the hardware
/// would fault.
///
/// # Safety
/// The addresses of loads, stores and configurations are valid for the bytes the op reads or
/// writes.
unsafe fn run(s: &mut State, op: Op) -> Result<(), &'static str> {
    let configured = |s: &State, t: usize| {
        if s.palette == 0 {
            Err("tiles not configured (no ldtilecfg)")
        } else if s.rows[t] == 0 {
            Err("a tile the configuration leaves empty")
        } else {
            Ok(())
        }
    };
    match op {
        Op::LdTileCfg(addr) => {
            let c = std::slice::from_raw_parts(addr as *const u8, 64);
            if c[0] == 0 {
                *s = INIT;
                return Ok(());
            }
            // Palette 1: 8 tiles; colsb of tile t at 16 + 2t, rows at 48 + t; the rest zero.
            if c[0] != 1 {
                return Err("palette other than 0 or 1");
            }
            if c[1] != 0 {
                return Err("start_row other than 0");
            }
            let reserved = c[2..16].iter().chain(&c[32..48]).chain(&c[56..64]);
            if reserved.into_iter().any(|&x| x != 0) {
                return Err("a reserved configuration byte set");
            }
            let mut next = INIT;
            next.palette = 1;
            for t in 0..TILES {
                let (colsb, rows) = (u16::from_le_bytes([c[16 + 2 * t], c[17 + 2 * t]]), c[48 + t]);
                if colsb > 64 || rows > 16 || (colsb == 0) != (rows == 0) {
                    return Err("a tile shape palette 1 does not allow");
                }
                (next.colsb[t], next.rows[t]) = (colsb, rows);
            }
            *s = next;
        }
        Op::StTileCfg(addr) => {
            let c = std::slice::from_raw_parts_mut(addr as *mut u8, 64);
            c.fill(0);
            c[0] = s.palette;
            for t in 0..TILES {
                c[16 + 2 * t..18 + 2 * t].copy_from_slice(&s.colsb[t].to_le_bytes());
                c[48 + t] = s.rows[t];
            }
        }
        Op::Release => *s = INIT,
        Op::Zero(t) => {
            configured(s, t)?;
            s.t[t] = [[0; 64]; 16];
        }
        Op::Load { t, addr, stride } => {
            configured(s, t)?;
            let (rows, n) = (s.rows[t] as usize, s.colsb[t] as usize);
            s.t[t] = [[0; 64]; 16];
            for r in 0..rows {
                let src = (addr + r * stride) as *const u8;
                std::ptr::copy_nonoverlapping(src, s.t[t][r].as_mut_ptr(), n);
            }
        }
        Op::Store { t, addr, stride } => {
            configured(s, t)?;
            let (rows, n) = (s.rows[t] as usize, s.colsb[t] as usize);
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(s.t[t][r].as_ptr(), (addr + r * stride) as *mut u8, n);
            }
        }
        Op::Dp { c, a, b } => {
            for t in [c, a, b] {
                configured(s, t)?;
            }
            if c == a || c == b || a == b {
                return Err("tdpbf16ps with a tile named twice");
            }
            // C is M x N f32, A is M x K pairs, B is K x N pairs.
            let (m, k, n) = (s.rows[c] as usize, s.colsb[a] as usize / 4, s.colsb[c] as usize / 4);
            if s.rows[a] as usize != m
                || s.rows[b] as usize != k
                || s.colsb[b] != s.colsb[c]
                || !s.colsb[a].is_multiple_of(4)
            {
                return Err("tdpbf16ps on tiles whose shapes do not fit");
            }
            let order = order();
            let word =
                |t: &[[u8; 64]; 16], r: usize, w: usize| u32::from_le_bytes(t[r][4 * w..4 * w + 4].try_into().unwrap());
            let (ta, tb) = (s.t[a], s.t[b]);
            let tc = &mut s.t[c];
            for i in 0..m {
                let mut row = [0u8; 64];
                for j in 0..n {
                    let acc = f32::from_bits(word(tc, i, j));
                    let acc = dot(order, acc, k, |q| word(&ta, i, q), |q| word(&tb, q, j));
                    row[4 * j..4 * j + 4].copy_from_slice(&sdm_flush(acc).to_bits().to_le_bytes());
                }
                // write_row_and_zero: the bytes past N words are zeroed.
                tc[i] = row;
            }
            for r in tc.iter_mut().skip(m) {
                *r = [0; 64];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registers with distinct values: register `i` holds `(i + 1) << 20`.
    const REGS: [u64; 16] = {
        let mut r = [0u64; 16];
        let mut i = 0;
        while i < 16 {
            r[i] = ((i + 1) as u64) << 20;
            i += 1;
        }
        r
    };

    fn reg(i: usize) -> usize {
        REGS[i] as usize
    }

    fn dec(bytes: &[u8]) -> Result<(Op, usize), &'static str> {
        decode(|i| bytes.get(i).copied().unwrap_or(0x90), &REGS, 0x40_0000)
    }

    /// Encodings from GNU `as` 2.40 (`objdump -d -M intel`), an assembler apart from rustc's.
    #[test]
    fn decodes_what_gnu_as_encodes() {
        use Op::*;
        let (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi) = (0, 1, 2, 3, 4, 5, 6, 7);
        let (r8, r9, r11, r12, r13, r14, r15) = (8, 9, 11, 12, 13, 14, 15);
        let cases: &[(&[u8], Op)] = &[
            (&[0xc4, 0xe2, 0x4a, 0x5c, 0xc4], Dp { c: 0, a: 4, b: 6 }),
            (&[0xc4, 0xe2, 0x42, 0x5c, 0xdd], Dp { c: 3, a: 5, b: 7 }),
            (&[0xc4, 0xe2, 0x7b, 0x4b, 0x24, 0x08], Load { t: 4, addr: reg(rax), stride: reg(rcx) }),
            (&[0xc4, 0x82, 0x7b, 0x4b, 0x7c, 0x25, 0x00], Load { t: 7, addr: reg(r13), stride: reg(r12) }),
            (&[0xc4, 0xa2, 0x7b, 0x4b, 0x54, 0x4c, 0x40], Load { t: 2, addr: reg(rsp) + 0x40, stride: reg(r9) << 1 }),
            (&[0xc4, 0xe2, 0x7b, 0x4b, 0x4c, 0x95, 0xf8], Load { t: 1, addr: reg(rbp) - 8, stride: reg(rdx) << 2 }),
            (
                &[0xc4, 0x82, 0x7b, 0x4b, 0xac, 0xfb, 0x45, 0x23, 0x01, 0x00],
                Load { t: 5, addr: reg(r11) + 0x12345, stride: reg(r15) << 3 },
            ),
            (&[0xc4, 0xe2, 0x7a, 0x4b, 0x1c, 0x37], Store { t: 3, addr: reg(rdi), stride: reg(rsi) }),
            (&[0xc4, 0x82, 0x7a, 0x4b, 0x04, 0x30], Store { t: 0, addr: reg(r8), stride: reg(r14) }),
            (&[0xc4, 0xe2, 0x7b, 0x49, 0xd0], Zero(2)),
            (&[0xc4, 0xe2, 0x78, 0x49, 0x07], LdTileCfg(reg(rdi))),
            (&[0xc4, 0xc2, 0x78, 0x49, 0x45, 0x00], LdTileCfg(reg(r13))),
            (&[0xc4, 0xe2, 0x78, 0x49, 0x44, 0x24, 0x10], LdTileCfg(reg(rsp) + 0x10)),
            (&[0xc4, 0xe2, 0x79, 0x49, 0x03], StTileCfg(reg(rbx))),
            (&[0xc4, 0xe2, 0x78, 0x49, 0xc0], Release),
            (&[0xc4, 0xe2, 0x79, 0x4b, 0x0c, 0x18], Load { t: 1, addr: reg(rax), stride: reg(rbx) }),
        ];
        for (bytes, want) in cases {
            assert_eq!(dec(bytes), Ok((*want, bytes.len())), "{bytes:02x?}");
        }
        // Not run here: tdpfp16ps and tdpbssd (other AMX), vfmadd231ps (VEX.66.0F38 B8), ud2.
        for bytes in [
            &[0xc4, 0xe2, 0x6b, 0x5c, 0xc1][..],
            &[0xc4, 0xe2, 0x6b, 0x5e, 0xc1],
            &[0xc4, 0xe2, 0x71, 0xb8, 0xc2],
            &[0x0f, 0x0b],
        ] {
            assert!(dec(bytes).is_err(), "{bytes:02x?}");
        }
    }

    /// The state machine on its own: a configuration with short tiles zeroes what lies past
    /// them, and the uses the hardware faults on are refused.
    #[test]
    fn runs_the_sdm_pseudo_code() {
        let mut s = INIT;
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..TILES {
            cfg[16 + 2 * t] = 64;
            cfg[48 + t] = 16;
        }
        // SAFETY (all below): every address is of a live local array of the bytes the op uses.
        unsafe {
            assert_eq!(run(&mut s, Op::Zero(0)), Err("tiles not configured (no ldtilecfg)"));
            // C (tile 0) 2 rows x 2 words, A (tile 4) 2 rows x 3 pairs, B (tile 6) 3 rows x 2 words.
            (cfg[16], cfg[48], cfg[24], cfg[52], cfg[28], cfg[54]) = (8, 2, 12, 2, 8, 3);
            run(&mut s, Op::LdTileCfg(cfg.as_ptr() as usize)).unwrap();
            let mut back = [0xffu8; 64];
            run(&mut s, Op::StTileCfg(back.as_mut_ptr() as usize)).unwrap();
            assert_eq!(back, cfg);
            let bf = |x: f32| half::bf16::from_f32(x).to_bits() as u32;
            let pair = |lo: f32, hi: f32| bf(lo) | bf(hi) << 16;
            let a = [[pair(1.0, 2.0), pair(3.0, 4.0), pair(5.0, 6.0), 0xdead_beef]; 2];
            let b = [[pair(1.0, 0.5), pair(2.0, 0.25), 0xdead_beef, 0xdead_beef]; 3];
            let c = [[10.0f32, 20.0, 99.0, 99.0]; 2];
            run(&mut s, Op::Load { t: 4, addr: a.as_ptr() as usize, stride: 16 }).unwrap();
            run(&mut s, Op::Load { t: 6, addr: b.as_ptr() as usize, stride: 16 }).unwrap();
            run(&mut s, Op::Load { t: 0, addr: c.as_ptr() as usize, stride: 16 }).unwrap();
            assert_eq!(s.t[4][0][12..], [0; 52], "bytes past colsb zeroed");
            assert_eq!(s.t[6][3], [0; 64], "rows past `rows` zeroed");
            assert_eq!(run(&mut s, Op::Dp { c: 0, a: 6, b: 4 }), Err("tdpbf16ps on tiles whose shapes do not fit"));
            assert_eq!(run(&mut s, Op::Dp { c: 0, a: 4, b: 4 }), Err("tdpbf16ps with a tile named twice"));
            run(&mut s, Op::Dp { c: 0, a: 4, b: 6 }).unwrap();
            let mut out = [[-1.0f32; 4]; 2];
            run(&mut s, Op::Store { t: 0, addr: out.as_mut_ptr() as usize, stride: 16 }).unwrap();
            // C[i][j] += sum_q A[i].lo[q] B[q].lo[j] + A[i].hi[q] B[q].hi[j]; B's words are
            // (1, 0.5) and (2, 0.25) in every row.
            let want0 = 10.0 + (1.0 * 1.0 + 2.0 * 0.5) + (3.0 * 1.0 + 4.0 * 0.5) + (5.0 * 1.0 + 6.0 * 0.5);
            let want1 = 20.0 + (1.0 * 2.0 + 2.0 * 0.25) + (3.0 * 2.0 + 4.0 * 0.25) + (5.0 * 2.0 + 6.0 * 0.25);
            assert_eq!(out, [[want0, want1, -1.0, -1.0]; 2], "two words stored per row, nothing past them");
            run(&mut s, Op::Release).unwrap();
            assert_eq!(
                run(&mut s, Op::Store { t: 0, addr: out.as_mut_ptr() as usize, stride: 16 }).unwrap_err(),
                "tiles not configured (no ldtilecfg)"
            );
            cfg[2] = 1;
            assert_eq!(run(&mut s, Op::LdTileCfg(cfg.as_ptr() as usize)), Err("a reserved configuration byte set"));
        }
    }

    /// The linear losses through the public calls on a [`crate::Cpu`] set to the AMX kernels,
    /// against the same calls on the AVX512-BF16 kernels (both tested against f64 elsewhere):
    /// the choice reaches the products, in both gradient modes, over row chunks with an edge,
    /// ignored rows and a bias; the vocabulary-parallel form and the log-probs too. The two
    /// multiply the same bf16 terms, so they differ by f32 summation order only.
    #[test]
    fn linear_losses_on_the_emulated_tiles() {
        use crate::cpu::{Bf16Grad, CpuMatmul};
        use crate::parallel::{SingleProcess, VocabShard};
        use crate::{Cpu, DType, LinearCe, LinearLogprobs};
        use ndarray::{Array1, Array2};
        if !crate::cpu::matmul_bf16::available() || !install() {
            println!("skipped: the CPU has AMX tiles (the kernels run themselves) or no AVX512-BF16");
            return;
        }
        let (n, d, v) = (70, 45, 301);
        let val = |i: usize, s: f32| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * s;
        let h = Array2::from_shape_fn((n, d), |(i, j)| half::bf16::from_f32(val(i * d + j, 2.0)));
        let w = Array2::from_shape_fn((v, d), |(i, j)| half::bf16::from_f32(val(i * d + j + 3, 0.6)));
        let bias = Array1::from_shape_fn(v, |c| val(c + 11, 0.5));
        let t = Array1::from_shape_fn(n, |r| if r % 5 == 3 { -100 } else { (r * 37 % v) as i64 });
        let up = (Array1::from_shape_fn(n, |r| val(r, 1.0)), Array1::from_shape_fn(n, |r| val(r + 1, 0.1)));
        // Row chunks of 16: four and an edge of 6.
        let lc = LinearCe::default().with_workspace_bytes(16 * v * 4);
        let lp = LinearLogprobs::default().with_workspace_bytes(16 * v * 4);
        let close = |what: &str, x: &[f32], y: &[f32]| {
            let top = y.iter().fold(0f32, |m, a| m.max(a.abs()));
            for (i, (a, b)) in x.iter().zip(y).enumerate() {
                assert!((a - b).abs() <= 1e-4 * top, "{what} [{i}]: {a} against {b} (largest {top})");
            }
        };
        let shard = VocabShard { class0: 0, classes: v };
        for g in [Bf16Grad::Split, Bf16Grad::Rounded] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            let amx = Cpu { pool, matmul: Some(CpuMatmul::AmxBf16), bf16_grad: Some(g) };
            let dp = Cpu::with_threads(3).unwrap().with_matmul(CpuMatmul::Avx512Bf16).unwrap().with_bf16_grad(g);
            assert_eq!(amx.linear_matmul(DType::BF16).unwrap(), CpuMatmul::AmxBf16);
            let count = |c: &Cpu| c.pool.broadcast(|_| emulated_here()).iter().sum::<u64>();
            let before = count(&amx);
            let runs = |c: &Cpu| {
                let b = Some(bias.view());
                let whole = c.linear_cross_entropy(&h, &w, b, t.view(), &lc).unwrap();
                let split = c.linear_cross_entropy_vocab_parallel(&h, &w, b, t.view(), shard, &lc, &SingleProcess);
                let ups = Some((up.0.view(), up.1.view()));
                (whole, split.unwrap(), c.linear_logprobs(&h, &w, b, t.view(), &lp, ups).unwrap())
            };
            let ((x, xs, xl), (y, ys, yl)) = (runs(&amx), runs(&dp));
            let emulated = count(&amx) - before;
            assert!(emulated > 1000, "{g:?}: {emulated} tile instructions emulated on the AMX backend's threads");
            for (form, x, y) in [("whole", &x, &y), ("vocab-parallel", &xs, &ys)] {
                let what = |s: &str| format!("{g:?} {form}: {s}");
                assert_eq!(x.chunk_rows, 16);
                assert!((x.loss - y.loss).abs() <= 1e-6 * y.loss.abs(), "{}", what("loss"));
                for (name, a, b) in
                    [("grad_hidden", &x.grad_hidden, &y.grad_hidden), ("grad_weight", &x.grad_weight, &y.grad_weight)]
                {
                    let (a, b) = (a.as_ref().unwrap().to_f32(), b.as_ref().unwrap().to_f32());
                    close(&what(name), a.as_slice().unwrap(), b.as_slice().unwrap());
                }
                let (a, b) = (x.grad_bias.as_ref().unwrap(), y.grad_bias.as_ref().unwrap());
                close(&what("grad_bias"), a.as_slice().unwrap(), b.as_slice().unwrap());
            }
            close(&format!("{g:?} logprob"), xl.logprob.as_slice().unwrap(), yl.logprob.as_slice().unwrap());
            close(&format!("{g:?} entropy"), xl.entropy.as_slice().unwrap(), yl.entropy.as_slice().unwrap());
            for (name, a, b) in
                [("grad_hidden", &xl.grad_hidden, &yl.grad_hidden), ("grad_weight", &xl.grad_weight, &yl.grad_weight)]
            {
                let (a, b) = (a.as_ref().unwrap().to_f32(), b.as_ref().unwrap().to_f32());
                close(&format!("{g:?} logprobs {name}"), a.as_slice().unwrap(), b.as_slice().unwrap());
            }
            println!("{g:?}: the linear losses on the emulated tiles ({emulated} instructions) agree with AVX512-BF16");
        }
    }

    /// The three orders give different sums where rounding depends on the order (so the
    /// children of `emulated_with_other_summation_orders` do run other arithmetic).
    #[test]
    fn the_summation_orders_round_differently() {
        let bf = |x: f32| half::bf16::from_f32(x).to_bits() as u32;
        let pair = |lo: f32, hi: f32| bf(lo) | bf(hi) << 16;
        let (tiny, one) = (2f32.powi(-12), 1.0f32);
        // acc 1 plus two products of 2^-24: one rounding keeps them, two lose each.
        let x = [pair(tiny, tiny)];
        let sums = |acc: f32, x: &[u32], y: &[u32]| {
            [SumOrder::Sdm, SumOrder::Reversed, SumOrder::Fused].map(|o| dot(o, acc, x.len(), |q| x[q], |q| y[q]))
        };
        assert_eq!(sums(1.0, &x, &x), [1.0, 1.0, 1.0 + 2f32.powi(-23)]);
        // 1 first loses the two 2^-24 after it; the tiny ones first add up before it.
        let x = [pair(one, 0.0), pair(tiny, tiny)];
        assert_eq!(sums(0.0, &x, &x), [1.0, 1.0 + 2f32.powi(-23), 1.0 + 2f32.powi(-23)]);
    }

    /// The two emulated tests, run again in a child process of this test binary with `env`
    /// set: whether it passed, and what it printed.
    fn emulated_tests_with(env: &[(&str, &str)]) -> (bool, String) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "--nocapture", "--test-threads=2"])
            .args([
                "cpu::matmul_amx::tests::native_instructions_under_emulation",
                "cpu::matmul_amx::trap::tests::linear_losses_on_the_emulated_tiles",
            ])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let ok = out.status.success() && stdout.contains("test result: ok. 2 passed");
        (ok, format!("{env:?}: {stdout}\n{stderr}"))
    }

    /// The hardware may sum inside a `tdpbf16ps` in another order than the SDM's pseudo-code,
    /// which does not fix it. The tests' bounds and the first-use check must hold for any
    /// order, or an AMX CPU would fail them, or keep its kernels off, for nothing. So the two
    /// emulated tests run again in child processes: with the pairs summed last to first, and
    /// with each pair added in one rounding.
    #[test]
    fn emulated_with_other_summation_orders() {
        if !crate::cpu::matmul_bf16::available() || !install() {
            println!("skipped: the CPU has AMX tiles (their own order is tested) or no AVX512-BF16");
            return;
        }
        for order in ["reversed", "fused"] {
            let (ok, said) = emulated_tests_with(&[("XENT_TEST_AMX_SUM", order)]);
            assert!(ok, "{said}");
            assert!(said.contains(&format!("sums in {order} order")), "{said}");
            println!("the emulated tests passed with sums in {order} order");
        }
    }

    /// The AMX kernels' blocking set by `XENT_AMX_KC` and `XENT_AMX_MC` (for measuring on a
    /// first AMX machine): the emulated tests pass with small blocks (many blocks of `k`, many
    /// row tiles), and a bad value is one typed error naming the variable.
    #[test]
    fn emulated_with_other_blockings() {
        if !crate::cpu::matmul_bf16::available() || !install() {
            println!("skipped: the CPU has AMX tiles (their blockings are measured there) or no AVX512-BF16");
            return;
        }
        for (kc, mc) in [("64", "32"), ("1024", "96")] {
            let (ok, said) = emulated_tests_with(&[("XENT_AMX_KC", kc), ("XENT_AMX_MC", mc)]);
            assert!(ok, "{said}");
            assert!(said.contains(&format!("blocks ({kc}, {mc})")), "{said}");
            println!("the emulated tests passed with blocks (kc, mc) = ({kc}, {mc})");
        }
        let (ok, said) = emulated_tests_with(&[("XENT_AMX_KC", "100")]);
        assert!(!ok, "{said}");
        let want = "InvalidOption(\"XENT_AMX_KC=100: a multiple of 32 from 32 to 4096 (default 512)\")";
        assert!(said.contains(want), "{said}");
    }
}
