"""Test fixtures that ship with the package (the tiny random-weight model set); never imported by
the product itself, except through a test set's marker (see ``i2l_ext.worker.models``)."""
