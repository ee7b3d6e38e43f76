"""MediaPipe FaceMesh landmark index tables (478-point topology with refined lips, eyes, irises).

Shared by the motion rig, the decoder, the scripts and the tests; no code, only names for points.
"""

from __future__ import annotations

N_MESH = 468  # points without the iris refinements
INNER_UPPER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]  # inner lip contours, left to right
INNER_LOWER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
OUTER_UPPER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
OUTER_LOWER = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
CORNERS = [61, 291, 78, 308]
LIP_PAIRS = [(13, 14), (82, 87), (312, 317), (81, 178), (311, 402)]  # inner upper / lower lip, facing
LIP_MIDDLE = LIP_PAIRS[0]  # the inner lips at the middle of the mouth
OUTER_CORNERS = [61, 291]  # mouth corners on the outer lip contour
# upper / lower eyelid pairs, corner to corner, for each eye (image-left eye first)
EYE_PAIRS = [
    (159, 145),
    (158, 153),
    (160, 144),
    (161, 163),
    (157, 154),
    (386, 374),
    (385, 380),
    (387, 373),
    (388, 390),
    (384, 381),
]
EYE_OUTER = (33, 263)  # outer eye corners: their distance is the inter-ocular distance (IOD)
HEAD_PIVOT = [33, 263, 1, 152]  # outer eye corners, nose tip, chin: their mean is the pivot of head motion
# eyelid contours, corner to corner (upper lid, then lower lid)
LEFT_EYE_UPPER = [33, 246, 161, 160, 159, 158, 157, 173, 133]
LEFT_EYE_LOWER = [33, 7, 163, 144, 145, 153, 154, 155, 133]
RIGHT_EYE_UPPER = [263, 466, 388, 387, 386, 385, 384, 398, 362]
RIGHT_EYE_LOWER = [263, 249, 390, 373, 374, 380, 381, 382, 362]
EYE_LEFT_RING = LEFT_EYE_UPPER + LEFT_EYE_LOWER[1:-1]
EYE_RIGHT_RING = RIGHT_EYE_UPPER + RIGHT_EYE_LOWER[1:-1]
LEFT_BROW = [70, 63, 105, 66, 107]
RIGHT_BROW = [300, 293, 334, 296, 336]
# each brow's upper and lower contours, outer end to inner end
LEFT_BROW_ALL = [70, 63, 105, 66, 107, 46, 53, 52, 65, 55]
RIGHT_BROW_ALL = [300, 293, 334, 296, 336, 276, 283, 282, 295, 285]
LEFT_IRIS = [468, 469, 470, 471, 472]  # centre first (refine_landmarks=True only)
RIGHT_IRIS = [473, 474, 475, 476, 477]
FACE_OVAL_IDX = [
    10,
    338,
    297,
    332,
    284,
    251,
    389,
    356,
    454,
    323,
    361,
    288,
    397,
    365,
    379,
    378,
    400,
    377,
    152,
    148,
    176,
    149,
    150,
    136,
    172,
    58,
    132,
    93,
    234,
    127,
    162,
    21,
    54,
    103,
    67,
    109,
]
# points that move with the skull only: eye corners, nose bridge, forehead, temples
RIGID_UPPER = [33, 133, 362, 263, 168, 6, 197, 195, 10, 151, 109, 338, 234, 454, 127, 356]
