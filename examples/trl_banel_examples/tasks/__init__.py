"""Ready-made tasks for BaNEL experiments: small models and reward oracles, shipped as this package's data.

- :mod:`trl_banel_examples.tasks.addition`: the adversarial attack on a tiny digit-addition transformer.
- :mod:`trl_banel_examples.tasks.letters`: rare letters, a sparse task whose success probability is known exactly.
- :mod:`trl_banel_examples.tasks.digits`: digits 0-to-6, a generator of zeros asked for sixes (sparse, Monte Carlo
  prior).
- :mod:`trl_banel_examples.tasks.hard_attack`: the addition attack without leading zeros against a stronger target
  (sparse, exact prior by enumeration).
- :mod:`trl_banel_examples.tasks.common`: what they share (tokenizer, sampler, sequence likelihoods, pretraining loop).
"""
