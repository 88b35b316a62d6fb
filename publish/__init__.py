"""Publishing: push a run to the Hub with its model card (the card answers its examples through chat)."""
