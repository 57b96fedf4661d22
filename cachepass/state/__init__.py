"""The device-resident cache state: its layout, fixed at compile time (`layout`), and the state of
each model instance at run time with ``stats`` / ``reset`` (`runtime`)."""
