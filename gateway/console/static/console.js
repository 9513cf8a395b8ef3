// Keyboard shortcuts for the review console. Everything they do is also a plain button.
(function () {
  function typing(el) {
    return el && (el.tagName === "TEXTAREA" || el.tagName === "INPUT" || el.tagName === "SELECT" || el.isContentEditable);
  }
  function click(id) { var el = document.getElementById(id); if (el) { el.click(); return true; } return false; }
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (typing(document.activeElement)) {
      if (ev.key === "Escape") document.activeElement.blur();
      return;
    }
    var handled = false;
    switch (ev.key) {
      case "a": handled = click("btn-approve"); break;
      case "r": handled = click("btn-reject"); break;
      case "c": handled = click("btn-correct"); break;
      case "d": handled = click("btn-draft"); break;  // use the teacher's draft
      case "e": var t = document.getElementById("corrected_answer"); if (t) { t.focus(); handled = true; } break;
      case "n": handled = click("review-next"); break;
      case "q": window.location.href = "/console"; handled = true; break;
    }
    if (handled) ev.preventDefault();
  });
})();
