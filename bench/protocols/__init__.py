"""The evaluation protocols of a run, one module and one stage each (``STAGE``):
stress shifts, leave-one-lab-out, patients (bags), external sets, distillation and the
leakage audit. None of them imports the report."""
