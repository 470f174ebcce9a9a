"""The one definition of the audio rate and frame hop.

Everything stored is 16 kHz mono; log-mel frames, activity labels, phoneme
tracks and diarization output all share one 10 ms hop, so frame `f` means the
same 160 samples everywhere.
"""

SAMPLE_RATE = 16_000
HOP = 160                          # Samples per frame: 10 ms.
FRAME_SECONDS = HOP / SAMPLE_RATE  # 0.01.
