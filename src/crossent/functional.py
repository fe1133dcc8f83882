"""placeholder, being written"""
def cross_entropy(*a, **k): raise NotImplementedError
def focal_loss(*a, **k): raise NotImplementedError
def flsd53(p): raise NotImplementedError
