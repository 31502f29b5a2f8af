"""emax benchmarks: ``python -m benchmarks.run --smoke|--quick|--full|--gpu``.

See :mod:`benchmarks.run` for the command line and the module layout, and
:mod:`benchmarks.peers` for how to add a row.
"""
