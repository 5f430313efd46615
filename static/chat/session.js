// Signing out forgets what this tab kept for the signed-in user (messages not sent yet).

document.querySelector(".logout-form")?.addEventListener("submit", () => {
  for (const key of Object.keys(sessionStorage)) {
    if (key.startsWith("chat:")) sessionStorage.removeItem(key);
  }
});
