"""``mf doctor``: whether this package computes correctly on this machine, and how fast, in one report.

``machine`` the environment · ``timing`` how a measurement is timed · ``agreement`` every Memory Layer
backend against the reference · ``speed`` the Memory Layer against ``nn.Linear`` and the copy bandwidth ·
``training`` a short training of both architectures · ``decoding`` the compiled decoding step ·
``report`` the markdown and its verdict · ``cli`` the command. ``benchmarks/`` measures with these too.
"""
