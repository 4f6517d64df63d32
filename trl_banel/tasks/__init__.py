"""Ready-made tasks for BaNEL experiments: small models and reward oracles that ship with the package.

- :mod:`trl_banel.tasks.addition`: the adversarial attack on a tiny digit-addition transformer.
"""
