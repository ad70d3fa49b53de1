"""The bounds of the guarantee on what an attacker recovers: mu-GDP's tight bound and (epsilon, delta)-DP's."""

from __future__ import annotations

import math

__all__ = ["gdp_bound", "gdp_bound_context", "dp_bound"]


def gdp_bound(p_prior: float, mu: float) -> float:
    """The tight bound on reconstruction success of a mu-GDP mechanism (one Gaussian release of L2
    sensitivity 2C and std sigma is mu-GDP with mu = 2C / sigma; R releases compose to mu * sqrt(R)):
    Phi(Phi^-1(p_prior) + mu), where p_prior is the attacker's best success without the release
    (Hayes, Mahloujifar & Balle, "Bounding data reconstruction attacks with the hypothesis testing
    interpretation of differential privacy", NeurIPS 2023: success <= 1 - f(p_prior) for an f-DP
    mechanism, and f(a) = Phi(Phi^-1(1 - a) - mu) for mu-GDP)."""
    from scipy.stats import norm

    return float(norm.cdf(norm.ppf(p_prior) + mu))


def gdp_bound_context(kappa, mu: float) -> float:
    """The same bound for an attacker with context, averaged over tokens: mean_i Phi(Phi^-1(kappa_i) + mu), where
    kappa_i is the attacker's best success on token i without the release when it knows the other tokens (here:
    the public LM's top probability given the true prefix; DP's threat model grants the attacker the rest of the
    data). With every kappa_i = p_prior it is :func:`gdp_bound`."""
    import numpy as np
    from scipy.stats import norm

    k = np.clip(np.asarray(kappa, dtype=np.float64), 1e-12, 1 - 1e-12)
    return float(norm.cdf(norm.ppf(k) + mu).mean())


def dp_bound(epsilon: float, p_prior: float, delta: float) -> float:
    """The bound e^epsilon * p_prior + delta of (epsilon, delta)-DP on reconstruction success (1 above epsilon 50)."""
    return 1.0 if epsilon > 50 else min(1.0, math.exp(epsilon) * p_prior + delta)
