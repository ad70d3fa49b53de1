"""The privacy audit behind ``jobs/audit.py``: what an attacker recovers from Z against the utility lost.

For every split point k and privacy level (an epsilon of ``privacy=gaussian``, or a sigma of
``privacy=sigma``) the audit runs the model in one process with the privacy transform at layer k, on
held-out rows (``audit.eval_path``, default: the shipped sample data), and measures

- utility relative to privacy off: perplexity ratio (causal LMs) and the cosine similarity of the
  mean-pooled final hidden states to the noise-free ones (the ``task=embed`` output);
- leakage as top-1 recovery of the token at each real position of Z, by four attackers who see only
  Z and know the model, the mechanism and sigma: nearest neighbour against the embedding matrix (k=0),
  the Bayes MAP decoder with the clipping in its candidates and the public unigram as its prior (k=0),
  the model's own final norm and LM head applied to Z (any k), and an MLP probe trained on *public*
  text (``audit.public_path``, default: the built-in standard-library prose) passed through the same
  mechanism, and a learned sequence inverter (a small transformer over a row's whole Z) trained the
  same way (the noise-aware attackers). ``best_recovery`` is the best of them: a lower bound on what
  an attacker can recover, never a guarantee;
- the floor: always guessing the public text's most frequent token;
- the bounds of the guarantee, p_prior being the frequency of the most common token of the held-out
  rows (the best guess of an attacker who knows the unigram distribution and not Z): the tight bound of
  mu-GDP, Phi(Phi^-1(p_prior) + mu) with mu = 2C / sigma (``bound_gdp``, see :func:`gdp_bound`), and
  the looser e^epsilon * p_prior + delta of (epsilon, delta)-DP (``bound``).

The grid of settings is shared among the MPI ranks (each rank runs the whole model); rank 0 writes
``audit.h5``, ``audit.csv``, ``audit.json`` and three PNG figures into ``audit.out_dir``.

Modules: :mod:`.settings` (``audit.*``), :mod:`.corpus` (the public and held-out rows, their states, the
owner-alone baseline), :mod:`.attackers` (the attackers on Z), :mod:`.gradient` (the gradient-message audit),
:mod:`.bounds`, :mod:`.point` (one grid point), :mod:`.report` (files and figures), :mod:`.run` (the job).
"""
