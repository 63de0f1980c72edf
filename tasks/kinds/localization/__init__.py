"""Temporal action localization (weakly supervised): snippet features of untrimmed videos with
video-level labels in, scored segments out, evaluated by THUMOS-protocol detection mAP."""
