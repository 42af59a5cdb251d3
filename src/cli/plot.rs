//! The `xent bench --plot` chart: throughput against V (log scale), one line per backend,
//! laid out once as marks and rendered as SVG or rasterised to PNG (8x8 bitmap font).

use font8x8::UnicodeFonts;

/// Where a text's x coordinate sits.
#[derive(Clone, Copy, PartialEq)]
enum Anchor {
    Start,
    Middle,
    End,
}

enum Mark {
    Line { a: (f64, f64), b: (f64, f64), colour: &'static str },
    Poly { pts: Vec<(f64, f64)>, colour: &'static str },
    Dot { at: (f64, f64), colour: &'static str, title: String },
    Text { at: (f64, f64), text: String, anchor: Anchor, big: bool, vertical: bool, colour: &'static str },
}

/// A laid-out chart.
pub(crate) struct Chart {
    w: f64,
    h: f64,
    marks: Vec<Mark>,
}

/// One measured point: backend, N, V, GB/s.
pub(crate) struct Point {
    pub backend: &'static str,
    pub n: usize,
    pub v: usize,
    pub gbps: f64,
}

impl Chart {
    /// Lays out throughput against V for each backend.
    pub(crate) fn throughput(points: &[Point], op: &str) -> Chart {
        let (w, h, l, r, t, b) = (720.0, 440.0, 70.0, 50.0, 40.0, 60.0);
        let lv = |v: usize| (v as f64).log2();
        let (vmin, vmax) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(lv(p.v)), b.max(lv(p.v))));
        let (vmin, vmax) = if vmax - vmin < 1.0 { (vmin - 0.5, vmax + 0.5) } else { (vmin, vmax) };
        let gmax = points.iter().fold(0.0f64, |m, p| m.max(p.gbps)).max(1e-3) * 1.1;
        let px = |v: usize| l + (lv(v) - vmin) / (vmax - vmin) * (w - l - r);
        let py = |g: f64| h - b - g / gmax * (h - t - b);
        let text =
            |at, text: String, anchor, colour| Mark::Text { at, text, anchor, big: false, vertical: false, colour };
        let mut m = vec![
            Mark::Text {
                at: (w / 2.0, 22.0),
                text: format!("xent cross-entropy {op}: throughput against V"),
                anchor: Anchor::Middle,
                big: true,
                vertical: false,
                colour: "#000000",
            },
            Mark::Line { a: (l, h - b), b: (w - r, h - b), colour: "#000000" },
            Mark::Line { a: (l, t), b: (l, h - b), colour: "#000000" },
            text(((l + w - r) / 2.0, h - 15.0), "classes V (log scale)".into(), Anchor::Middle, "#000000"),
            Mark::Text {
                at: (16.0, (t + h - b) / 2.0),
                text: "GB/s of useful traffic".into(),
                anchor: Anchor::Middle,
                big: false,
                vertical: true,
                colour: "#000000",
            },
        ];
        for i in 0..=4 {
            let g = gmax * i as f64 / 4.0;
            m.push(text((l - 6.0, py(g) + 4.0), format!("{g:.2}"), Anchor::End, "#000000"));
        }
        let mut vs: Vec<usize> = points.iter().map(|p| p.v).collect();
        vs.sort();
        vs.dedup();
        for v in vs {
            m.push(text((px(v), h - b + 18.0), v.to_string(), Anchor::Middle, "#000000"));
        }
        for (backend, colour) in [("cpu", "#0077BB"), ("gpu", "#EE7733")] {
            let mut pts: Vec<&Point> = points.iter().filter(|p| p.backend == backend).collect();
            if pts.is_empty() {
                continue;
            }
            pts.sort_by_key(|p| p.v);
            m.push(Mark::Poly { pts: pts.iter().map(|p| (px(p.v), py(p.gbps))).collect(), colour });
            for p in &pts {
                let title = format!("{backend} {}x{}: {:.2} GB/s", p.n, p.v, p.gbps);
                m.push(Mark::Dot { at: (px(p.v), py(p.gbps)), colour, title });
            }
            let last = pts.last().expect("non-empty");
            m.push(text((px(last.v) - 30.0, py(last.gbps) - 8.0), backend.into(), Anchor::Start, colour));
        }
        Chart { w, h, marks: m }
    }

    /// The chart as an SVG document.
    pub(crate) fn svg(&self) -> String {
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
            self.w, self.h
        );
        for mark in &self.marks {
            s += &match mark {
                Mark::Line { a, b, colour } => {
                    format!("<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{colour}\"/>\n", a.0, a.1, b.0, b.1)
                }
                Mark::Poly { pts, colour } => {
                    let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                    format!(
                        "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n",
                        p.join(" ")
                    )
                }
                Mark::Dot { at, colour, title } => format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{colour}\"><title>{title}</title></circle>\n",
                    at.0, at.1
                ),
                Mark::Text { at, text, anchor, big, vertical, colour } => {
                    let a = match anchor {
                        Anchor::Start => "start",
                        Anchor::Middle => "middle",
                        Anchor::End => "end",
                    };
                    let size = if *big { " font-size=\"15\"" } else { "" };
                    let rot =
                        if *vertical { format!(" transform=\"rotate(-90 {} {})\"", at.0, at.1) } else { String::new() };
                    format!(
                        "<text x=\"{}\" y=\"{}\" text-anchor=\"{a}\" fill=\"{colour}\"{size}{rot}>{text}</text>\n",
                        at.0, at.1
                    )
                }
            };
        }
        s + "</svg>\n"
    }

    /// The chart rasterised to an RGB PNG.
    pub(crate) fn png(&self) -> Vec<u8> {
        let mut c = Canvas::new(self.w as usize, self.h as usize);
        for mark in &self.marks {
            match mark {
                Mark::Line { a, b, colour } => c.segment(*a, *b, 0.6, rgb(colour)),
                Mark::Poly { pts, colour } => {
                    for s in pts.windows(2) {
                        c.segment(s[0], s[1], 1.2, rgb(colour));
                    }
                }
                Mark::Dot { at, colour, .. } => c.disc(*at, 4.0, rgb(colour)),
                Mark::Text { at, text, anchor, big, vertical, colour } => {
                    c.text(*at, text, *anchor, if *big { 2 } else { 1 }, *vertical, rgb(colour))
                }
            }
        }
        c.encode()
    }
}

fn rgb(hex: &str) -> [u8; 3] {
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap_or(0);
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas { w, h, px: vec![255; w * h * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn disc(&mut self, (cx, cy): (f64, f64), r: f64, c: [u8; 3]) {
        let (x0, x1, y0, y1) =
            ((cx - r).floor() as i64, (cx + r).ceil() as i64, (cy - r).floor() as i64, (cy + r).ceil() as i64);
        for y in y0..=y1 {
            for x in x0..=x1 {
                if (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2) <= r * r {
                    self.set(x, y, c);
                }
            }
        }
    }

    /// A segment of half-width `r`, stamped every half pixel.
    fn segment(&mut self, a: (f64, f64), b: (f64, f64), r: f64, c: [u8; 3]) {
        let steps = ((b.0 - a.0).hypot(b.1 - a.1) * 2.0).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let f = i as f64 / steps as f64;
            self.disc((a.0 + f * (b.0 - a.0), a.1 + f * (b.1 - a.1)), r, c);
        }
    }

    /// 8x8 bitmap text scaled by `scale`; `at.1` is the baseline (vertical: reads bottom-up).
    fn text(&mut self, at: (f64, f64), s: &str, anchor: Anchor, scale: i64, vertical: bool, c: [u8; 3]) {
        let chars = s.chars().count() as f64;
        // Large text that would not fit the canvas falls back to the small size.
        let scale = if chars * 8.0 * scale as f64 > self.w as f64 - 20.0 { 1 } else { scale };
        let len = chars * 8.0 * scale as f64;
        let shift = match anchor {
            Anchor::Start => 0.0,
            Anchor::Middle => len / 2.0,
            Anchor::End => len,
        };
        for (k, ch) in s.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS.get(ch).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 0 {
                        continue;
                    }
                    for dy in 0..scale {
                        for dx in 0..scale {
                            // Offsets along and across the text direction.
                            let along = (k as i64 * 8 + col) * scale + dx - shift as i64;
                            let across = (row as i64 - 8) * scale + dy;
                            let (x, y) = if vertical {
                                (at.0 as i64 + across, at.1 as i64 - along)
                            } else {
                                (at.0 as i64 + along, at.1 as i64 + across)
                            };
                            self.set(x, y, c);
                        }
                    }
                }
            }
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut wr = enc.write_header().expect("PNG header into memory");
            wr.write_image_data(&self.px).expect("PNG data into memory");
        }
        out
    }
}
