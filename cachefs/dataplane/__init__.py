"""The C data plane's Python side (../shared/DATAPLANE.md; docs/design.md, "Two planes").

``plane.py`` is the C thread and its calls (the only module here that
imports cachefs.native); ``handles.py`` decides what C is given per handle
and image; ``mapping.py`` keeps C's copy of a qcow2 image's map true;
``lending.py`` lends C host clusters and adopts what it allocated.
"""
