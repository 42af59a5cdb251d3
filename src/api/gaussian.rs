//! Continuous cross-entropy: closed forms for univariate Gaussians (nats).

/// H(p, q) for p = N(mu_p, sigma_p^2), q = N(mu_q, sigma_q^2):
/// `0.5 ln(2 pi sigma_q^2) + (sigma_p^2 + (mu_p - mu_q)^2) / (2 sigma_q^2)`.
///
/// ```
/// let h = xent::gaussian::cross_entropy(0.0, 1.0, 0.0, 1.0);
/// assert!((h - xent::gaussian::entropy(1.0)).abs() < 1e-15);
/// ```
pub fn cross_entropy(mu_p: f64, sigma_p: f64, mu_q: f64, sigma_q: f64) -> f64 {
    0.5 * (2.0 * std::f64::consts::PI * sigma_q * sigma_q).ln()
        + (sigma_p * sigma_p + (mu_p - mu_q).powi(2)) / (2.0 * sigma_q * sigma_q)
}

/// H(p) for p = N(mu, sigma^2): `0.5 ln(2 pi e sigma^2)`.
pub fn entropy(sigma: f64) -> f64 {
    0.5 * (2.0 * std::f64::consts::PI * std::f64::consts::E * sigma * sigma).ln()
}

/// KL(p || q) = H(p, q) - H(p) = `ln(sigma_q / sigma_p) + (sigma_p^2 + (mu_p - mu_q)^2) / (2 sigma_q^2) - 1/2`.
pub fn kl(mu_p: f64, sigma_p: f64, mu_q: f64, sigma_q: f64) -> f64 {
    (sigma_q / sigma_p).ln() + (sigma_p * sigma_p + (mu_p - mu_q).powi(2)) / (2.0 * sigma_q * sigma_q) - 0.5
}
