"""The paper's ablation figures (MTEB averages at 1.4B), printed beside ours."""

# Table 4: (SM, CLR, DHNM) → Multi, Eng, Zh.
PAPER_TABLE_4 = {(True, False, False): (61.73, 70.41, 70.99), (False, True, False): (62.69, 70.94, 71.41),
                 (False, False, True): (61.81, 71.50, 72.09), (True, True, False): (64.45, 72.14, 71.79),
                 (True, False, True): (63.03, 72.78, 72.44), (True, True, True): (65.17, 73.52, 74.24)}
# Table 12 (soft mask only): schedule → Multi, Eng, Zh.
PAPER_TABLE_12 = {"linear": (61.73, 70.41, 70.99), "accelerating": (61.50, 70.51, 70.81),
                  "decelerating": (61.43, 70.01, 70.37)}
